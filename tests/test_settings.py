import pytest

from sorter.errors import ConfigError
from sorter.settings import load_settings


def test_env_nested_and_file_and_overrides(tmp_path, monkeypatch):
    cfg = tmp_path / "sorter.yaml"
    cfg.write_text("kafka: {group_id: from-file, commands_topic: cmds}\nbatch: {max_size: 8}\n")
    monkeypatch.setenv("SORTER_KAFKA__GROUP_ID", "from-env")
    monkeypatch.setenv("SORTER_BATCH__MAX_WAIT_MS", "5")
    monkeypatch.setenv("SORTER_KAFKA__CLIENT__SASL_PASSWORD", "hunter2")
    s = load_settings(cfg, routes=tmp_path / "r.yaml")
    assert s.kafka.group_id == "from-env"  # env beats file
    assert s.kafka.commands_topic == "cmds" and s.batch.max_size == 8 and s.batch.max_wait_ms == 5
    assert s.kafka.client_config() == {"sasl.password": "hunter2"}
    assert s.routes == tmp_path / "r.yaml"
    assert load_settings(cfg, kafka={"group_id": "flag"}).kafka.group_id == "flag"  # flags beat env


def test_secrets_never_appear_in_the_logged_settings(monkeypatch):
    monkeypatch.setenv("SORTER_REDIS__URL", "redis://:s3cret@redis:6379/0")
    monkeypatch.setenv("SORTER_KAFKA__CLIENT__SASL_PASSWORD", "hunter2")
    s = load_settings()
    text = repr(s.redacted()) + repr(s)
    assert "s3cret" not in text and "hunter2" not in text
    assert s.redis.url.get_secret_value() == "redis://:s3cret@redis:6379/0"
    assert s.redacted()["kafka"]["client"] == ["sasl_password"]


@pytest.mark.parametrize(
    "env, field",
    [
        ({"SORTER_BATCH__MAX_SIZE": "0"}, "batch.max_size"),
        ({"SORTER_KAFKA__FRAMES_PATTERN": "frames.(("}, "kafka.frames_pattern"),
        ({"SORTER_REDIS__TTL_S": "soon"}, "redis.ttl_s"),
    ],
)
def test_invalid_settings_name_the_field(monkeypatch, env, field):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_settings()


def test_pattern_is_anchored_for_librdkafka():
    assert load_settings(kafka={"frames_pattern": r"cam\..+"}).kafka.frames_pattern == r"^cam\..+"


def test_sasl_tls_and_redis_tls_reach_the_clients_and_stay_out_of_errors(monkeypatch):
    """Kafka SASL/TLS and Redis TLS + password, checked at the config level (librdkafka validates names)."""
    import redis
    from confluent_kafka import Consumer, Producer

    from sorter.stream.kafka import consumer_config, producer_config

    for key, value in {
        "SECURITY_PROTOCOL": "SASL_SSL",
        "SASL_MECHANISM": "SCRAM-SHA-512",
        "SASL_USERNAME": "sorter",
        "SASL_PASSWORD": "hunter2",
        "SSL_ENDPOINT_IDENTIFICATION_ALGORITHM": "https",
    }.items():
        monkeypatch.setenv(f"SORTER_KAFKA__CLIENT__{key}", value)
    monkeypatch.setenv("SORTER_REDIS__URL", "rediss://:s3cret@redis.example:6380/0")
    s = load_settings()
    cc, pc = consumer_config(s.kafka), producer_config(s.kafka)
    assert cc["security.protocol"] == pc["security.protocol"] == "SASL_SSL"
    assert cc["sasl.password"] == "hunter2" and cc["ssl.endpoint.identification.algorithm"] == "https"
    Producer(pc)  # librdkafka accepts every property name and value (a typo would raise here)
    Consumer(cc).close()
    client = redis.Redis.from_url(s.redis.url.get_secret_value())
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["password"] == "s3cret" and client.connection_pool.connection_class is redis.SSLConnection
    monkeypatch.setenv("SORTER_BATCH__MAX_SIZE", "-1")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "hunter2" not in str(info.value) and "s3cret" not in str(info.value)


def test_a_misspelt_key_in_a_settings_file_is_refused_with_its_name(tmp_path):
    cfg = tmp_path / "sorter.yaml"
    cfg.write_text("kafka: {bootstrap_server: broker:9092}\n")
    with pytest.raises(ConfigError, match=r"kafka\.bootstrap_server"):
        load_settings(cfg)


def test_an_unknown_sorter_variable_is_warned_about_with_the_closest_real_one(monkeypatch):
    from structlog.testing import capture_logs

    monkeypatch.setenv("SORTER_KAFKA_BOOTSTRAP_SERVERS", "broker:9092")  # one underscore: not nested
    with capture_logs() as logs:
        load_settings()
    (warning,) = [e for e in logs if e.get("variable") == "SORTER_KAFKA_BOOTSTRAP_SERVERS"]
    assert warning["event"] == "settings.unknown_variable"
    assert warning["did_you_mean"] == "SORTER_KAFKA__BOOTSTRAP_SERVERS"


def test_variables_something_else_reads_are_not_warned_about():
    """Kubernetes service links of a Service named sorter-metrics, a whole section as JSON, any case."""
    from sorter.settings import warn_unknown_variables

    environ = {
        "SORTER_METRICS_SERVICE_HOST": "10.0.0.1",
        "SORTER_METRICS_SERVICE_PORT": "9400",
        "SORTER_METRICS_SERVICE_PORT_METRICS": "9400",
        "SORTER_METRICS_PORT": "tcp://10.0.0.1:9400",
        "SORTER_METRICS_PORT_9400_TCP": "tcp://10.0.0.1:9400",
        "SORTER_METRICS_PORT_9400_TCP_PROTO": "tcp",
        "SORTER_METRICS_PORT_9400_TCP_PORT": "9400",
        "SORTER_METRICS_PORT_9400_TCP_ADDR": "10.0.0.1",
        "SORTER_KAFKA": '{"group_id": "g2"}',
        "sorter_kafka__group_id": "g3",
        "SORTER_SERVICE_HOST": "10.0.0.2",  # a Service named just sorter
        "SORTER_PORT": "tcp://10.0.0.2:9400",
        "SORTER_PORT_9400_TCP": "tcp://10.0.0.2:9400",
        "SORTER_REDIS__URLL": "redis://r:6379/0",
        "SORTER_OBSERVE_PORT": "9500",  # one underscore: a typo, not a service link (no SORTER_OBSERVE_SERVICE_HOST)
    }
    assert sorted(warn_unknown_variables(environ)) == ["SORTER_OBSERVE_PORT", "SORTER_REDIS__URLL"]


@pytest.mark.parametrize("url", ["http://redis:6379/0", "not a url"])
def test_a_redis_url_that_is_not_one_is_refused_at_once(url):
    with pytest.raises(ConfigError, match=r"redis\.url"):
        load_settings(redis={"url": url})
