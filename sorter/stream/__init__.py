"""The streaming worker, laid out in the order data flows through it:

frames (``contracts``) -> decode (``decode``) -> batch + model (``inference``) -> cache (``cache``)
-> route (``routing``) -> produce (``worker``). ``pipeline`` joins the middle steps as one pure-ish
function over a batch, so the Kafka loop, the model and the routing policy can each be tested alone.
"""
