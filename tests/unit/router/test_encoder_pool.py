"""The router's encoder ranking: min-load, cache affinity on the image hash, unhealthy last."""
from __future__ import annotations

import pytest

from baton.protos.errors import BatonError
from baton.router.encoders import EncoderPool


def pool(policy: str) -> EncoderPool:
    p = EncoderPool(["e1:1", "e2:1", "e3:1"], policy)
    for state, load in zip(p.encoders.values(), (5, 0, 2)):
        state.healthy, state.in_progress = True, load
    return p


def test_min_load_orders_by_reported_images_in_progress():
    assert pool("min_load").ranked(["ab" * 32]) == ["e2:1", "e3:1", "e1:1"]


def test_cache_affinity_sends_an_image_to_the_same_encoder_and_spreads_images():
    p = pool("cache_affinity")
    hashes = [f"{i:064x}" for i in range(60)]
    firsts = [p.ranked([h])[0] for h in hashes]
    assert firsts == [p.ranked([h])[0] for h in hashes]  # stable
    assert set(firsts) == {"e1:1", "e2:1", "e3:1"}  # every encoder gets some images
    p.encoders[firsts[0]].healthy = False  # its encoder fails: the others keep their images
    assert p.ranked([hashes[0]])[-1] == firsts[0]
    assert all(p.ranked([h])[0] == f for h, f in zip(hashes, firsts) if f != firsts[0])


def test_unhealthy_encoders_come_last_and_none_healthy_is_a_clear_error():
    p = pool("min_load")
    p.encoders["e2:1"].healthy = False
    assert p.ranked([]) == ["e3:1", "e1:1", "e2:1"]
    for state in p.encoders.values():
        state.healthy, state.last_error = False, "connection refused"
    with pytest.raises(BatonError, match="no encoder is available.*connection refused"):
        p.check_available()
    EncoderPool([], "min_load").check_available()  # none configured: the workers encode
    with pytest.raises(ValueError, match="unknown encoder policy"):
        EncoderPool(["e1:1"], "random")


def test_discovered_encoders_follow_the_name_and_an_empty_name_is_a_clear_error():
    import asyncio

    from baton.router.discovery import NameNotFound
    answers = [["10.0.0.1:50051", "10.0.0.2:50051"], ["10.0.0.2:50051", "10.0.0.3:50051"], OSError("dns timeout"),
               NameNotFound("enc")]

    async def resolver(host: str, port: int) -> list[str]:
        assert (host, port) == ("enc.ns.svc", 50051)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def main() -> None:
        p = EncoderPool(["static:1"], "min_load", discover="enc.ns.svc:50051", resolver=resolver)
        await p.rediscover()
        assert set(p.encoders) == {"static:1", "10.0.0.1:50051", "10.0.0.2:50051"}
        await p.rediscover()  # a pod gone, another come
        assert set(p.encoders) == {"static:1", "10.0.0.2:50051", "10.0.0.3:50051"}
        await p.rediscover()  # a flaky resolver changes nothing
        assert set(p.encoders) == {"static:1", "10.0.0.2:50051", "10.0.0.3:50051"}
        await p.rediscover()  # no ready pod: only the flag's encoder stays
        assert set(p.encoders) == {"static:1"}
        empty = EncoderPool([], "min_load", discover="enc.ns.svc:50051", resolver=resolver)
        assert empty  # configured: image requests must not fall back to the workers' towers
        with pytest.raises(BatonError, match="none behind enc.ns.svc:50051"):
            empty.check_available()
        await p.stop()
    asyncio.run(main())
