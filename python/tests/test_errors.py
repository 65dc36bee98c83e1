"""Failures before any request: no profile, a bad one, a coordinator that does not
answer; and the GIL is released while a request waits."""

import shutil
import socket
import threading
import time

import pytest

import berth


def test_a_missing_profile_raises_profile_error(tmp_path, monkeypatch):
    monkeypatch.delenv("BERTH_PROFILE", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert berth.profile_path() == str(tmp_path / "berth" / "profile.toml")
    with pytest.raises(berth.ProfileError) as e:
        berth.Client()
    assert e.value.code == 4 and "profile" in e.value.message
    monkeypatch.setenv("BERTH_PROFILE", str(tmp_path / "env.toml"))
    assert berth.profile_path() == str(tmp_path / "env.toml")


def test_a_bad_profile_raises_clearly(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("this is = not [a profile\n")
    with pytest.raises(berth.ProfileError) as e:
        berth.Client(bad)
    assert str(bad) in e.value.message


def test_an_unreachable_coordinator_raises_unreachable(cluster, tmp_path):
    # The real profile, pointed at a loopback port where nothing listens.
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    text = cluster.profile.read_text().replace(cluster.addr, f"127.0.0.1:{port}")
    assert f"127.0.0.1:{port}" in text
    p = tmp_path / "nowhere.toml"
    p.write_text(text)
    t = time.monotonic()
    with pytest.raises(berth.Unreachable) as e:
        berth.Client(p)
    assert isinstance(e.value, ConnectionError) and e.value.code == 4
    assert time.monotonic() - t < 30


def test_the_gil_is_released_while_waiting(client):
    job = client.submit("sleep 1", max_runtime="1m")
    ticks = []
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            ticks.append(time.monotonic())
            time.sleep(0.001)

    t = threading.Thread(target=spin)
    t.start()
    try:
        assert job.wait(timeout=30).ok
    finally:
        stop.set()
        t.join()
    # The other thread ran all along the wait (about a second of it).
    assert len(ticks) > 200, len(ticks)
