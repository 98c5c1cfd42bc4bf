"""The vision core: backbones, the spatial attention head, the classifier and its checkpoints.

Layering (lower never imports higher): ``attention`` and ``backbones`` are leaf modules;
``weights`` resolves pretrained files for ``backbones``; ``classifier`` composes a backbone with
the attention head; ``checkpoint`` saves/loads a classifier with the metadata to serve it.
"""
