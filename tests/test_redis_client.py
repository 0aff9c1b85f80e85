"""shared/redis_client.py without a Redis: how REDIS_URL's Sentinel form is read and handed to
redis-py and to kombu (the failover itself is tests/test_failover.py, with real Sentinels)."""

from __future__ import annotations

import pytest
import redis
from kombu.utils.url import url_to_parts
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import MasterNotFoundError, SentinelConnectionPool

from shared import redis_client, redis_state
from shared.celery_config import make_celery
from shared.settings import Settings


def test_sentinel_urls_in_celerys_form_and_the_short_one():
    celery_form = redis_client.parse_sentinel_url("sentinel://:s3cret@h1:26379;sentinel://:s3cret@h2:26380/2")
    short = redis_client.parse_sentinel_url("sentinel://:s3cret@h1:26379,h2:26380/2")
    assert celery_form == short
    assert short.sentinels == (("h1", 26379), ("h2", 26380)) and short.db == 2 and short.password == "s3cret"
    assert redis_client.parse_sentinel_url("sentinel://h1").sentinels == (("h1", 26379),)
    assert redis_client.parse_sentinel_url("sentinels://u:p%40ss@h1:1/0").password == "p@ss"
    assert redis_client.parse_sentinel_url("sentinels://u:p%40ss@h1:1/0").ssl


@pytest.mark.parametrize("url", ["sentinel://", "sentinel://h1:26379/mymaster", "sentinel://h1;redis://h2"])
def test_bad_sentinel_urls_say_why(url):
    with pytest.raises(ValueError, match="REDIS_URL"):
        redis_client.parse_sentinel_url(url)


def test_the_broker_gets_every_sentinel_as_kombu_wants_it():
    settings = Settings(redis_url="sentinel://:pw@h1:26379,h2:26380/1", redis_master_name="rerank",
                        redis_sentinel_password="spw")
    url, options = redis_client.broker(settings)
    assert url == "sentinel://:pw@h1:26379/1;sentinel://:pw@h2:26380/1"
    assert options["master_name"] == "rerank" and options["sentinel_kwargs"]["password"] == "spw"
    for part in url.split(";"):  # what kombu reads from each
        parts = url_to_parts(part)
        assert parts.scheme == "sentinel" and parts.password == "pw" and parts.path == "1"
    app = make_celery(settings, "t")
    assert app.conf.broker_transport_options["master_name"] == "rerank"
    assert app.conf.broker_transport_options["visibility_timeout"] == settings.visibility_timeout
    plain = Settings(redis_url="redis://h:6379/0")
    assert redis_client.broker(plain) == ("redis://h:6379/0", {})


def test_clients_of_a_sentinel_url_ask_the_sentinels():
    settings = Settings(redis_url="sentinel://:pw@127.0.0.1:1;127.0.0.1:2/3", redis_master_name="rerank")
    client = redis_client.connect(settings, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool) and pool.service_name == "rerank"
    assert pool.connection_kwargs["db"] == 3 and pool.connection_kwargs["password"] == "pw"
    assert [s.connection_pool.connection_kwargs["port"] for s in pool.sentinel_manager.sentinels] == [1, 2]
    # a Sentinel that is down is passed over at once, not after redis-py's default ten retries
    assert all(s.get_retry().get_retries() == 0 for s in pool.sentinel_manager.sentinels)
    with pytest.raises(MasterNotFoundError) as raised:  # no Sentinel listens there
        client.ping()
    assert redis_state.classify(raised.value).state == redis_state.FAILING_OVER
    assert redis_client.master_address(redis.Redis()) is None


def test_how_many_replicas_an_accepted_job_waits_for():
    assert redis_client.replicas_to_wait_for(Settings(redis_url="sentinel://h:1/0")) == 1
    assert redis_client.replicas_to_wait_for(Settings(redis_url="redis://h:1/0")) == 0
    assert redis_client.replicas_to_wait_for(Settings(redis_url="redis://h:1/0", redis_min_replicas=2)) == 2
    assert redis_client.replicas_to_wait_for(Settings(redis_url="sentinel://h:1/0", redis_min_replicas=0)) == 0


def test_passwords_stay_out_of_the_start_up_line():
    values = Settings(redis_url="sentinel://:pw1@h1:1;sentinel://:pw1@h2:2/0", redis_sentinel_password="pw2").redacted()
    assert "pw1" not in str(values) and "pw2" not in str(values)
