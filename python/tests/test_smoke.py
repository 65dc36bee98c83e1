def test_smoke(client):
    job = client.submit("echo hi; echo err >&2", max_runtime="1m")
    r = job.wait(timeout=30)
    assert r.ok and r.exit_code == 0, r
    assert job.text() == "hi\nerr\n" or set(job.text().split()) == {"hi", "err"}
    with client.session(cpus=1, pool="default") as s:
        r = s.exec("echo out; echo err >&2; exit 3")
        assert (r.exit_code, r.stdout, r.stderr) == (3, b"out\n", b"err\n"), r
