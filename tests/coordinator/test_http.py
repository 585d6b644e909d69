"""The HTTP API and its client against a real in-process coordinator.

A real `Coordinator` (in-process workers, memory job store, the session's
moto server for markers) behind the real aiohttp app on 127.0.0.1, spoken
to both with raw HTTP (status codes, headers, bodies) and with
`shardline.client.CoordinatorClient` (errors as ShardlineError subclasses).
"""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from openapi_spec_validator import validate

from shardline.client import CoordinatorClient
from shardline.coordinator import Coordinator, HttpAccess, make_app, openapi_document
from shardline.errors import (
    ConfigurationError,
    InputError,
    JobCancelledError,
    JobFailedError,
    JobNotFoundError,
    NotAcceptingJobsError,
    RetryableStorageError,
)
from shardline.protocol import SHARDS_PAGE_DEFAULT, JobLimits, JobSpec

from apiservice import in_process_coordinator
from faultproxy import Delay, FaultProxy, Rule, s3_internal_error, s3_slow_down
from jobs import sequential_reference

DATA = b"".join(b"line %05d of the input\n" % i for i in range(3000))
SED = "sed 's/^/>/'"
TOKEN = "s3cret-token"


async def _serve(coordinator: Coordinator, token: str | None = None) -> TestClient:
    server = TestServer(make_app(coordinator, access=HttpAccess(token=token)), host="127.0.0.1", port=0)
    # A generous bound, so a hung job fails its test instead of the whole run.
    http = TestClient(server, timeout=aiohttp.ClientTimeout(total=120))
    await http.start_server()
    return http


@pytest.fixture
async def http(coordinator):
    api = await _serve(coordinator)
    yield api
    await api.close()


@pytest.fixture
def source(tmp_path) -> str:
    path = tmp_path / "input.txt"
    path.write_bytes(DATA)
    return str(path)


def _url(http: TestClient) -> str:
    return str(http.make_url("")).rstrip("/")


async def test_submit_then_stream_output_byte_identical(http, source):
    response = await http.post("/jobs", json={"source": source, "shards": 5, "command": SED})
    assert response.status == 201, await response.text()
    view = await response.json()
    assert response.headers["Location"] == f"/jobs/{view['id']}"
    assert view["state"] in ("pending", "running") and view["shards_total"] == 5

    output = await http.get(f"/jobs/{view['id']}/output")
    assert output.status == 200
    assert output.headers["Content-Type"] == "application/octet-stream"
    assert await output.read() == sequential_reference(DATA, SED)

    done = await (await http.get(f"/jobs/{view['id']}")).json()
    assert done["state"] == "succeeded"
    assert [shard["index"] for shard in done["shards"]] == list(range(5))
    assert all(shard["state"] == "done" for shard in done["shards"])
    # The emitted ranges tile the input.
    assert done["shards"][0]["emitted"][0] == 0 and done["shards"][-1]["emitted"][1] == len(DATA)
    assert sum(shard["bytes"] for shard in done["shards"]) == len(DATA)


async def test_client_submits_streams_and_lists(http, source):
    async with CoordinatorClient(_url(http)) as api:
        view = await api.submit(JobSpec(source=source, shards=3, command="wc -l", reduce="awk '{s+=$1} END {print s}'"))
        output = b"".join([chunk async for chunk in api.output(view["id"])])
        assert output == b"3000\n"
        listed = await api.jobs()
        assert [job["id"] for job in listed] == [view["id"]]
        assert "shards" not in listed[0]
        assert (await api.job(view["id"]))["state"] == "succeeded"


async def test_a_job_view_lists_counts_and_one_page_of_shards(http, source):
    """GET /jobs/{id} shows every shard's counts but only the first page of
    shards; GET /jobs/{id}/shards pages through all of them, in order."""
    shards = 250
    view = await (await http.post("/jobs", json={"source": source, "shards": shards})).json()
    assert len(view["shards"]) == SHARDS_PAGE_DEFAULT and view["shards_next"] == SHARDS_PAGE_DEFAULT
    assert sum(view["shard_states"].values()) == shards
    output = await http.get(f"/jobs/{view['id']}/output")
    assert await output.read() == DATA

    done = await (await http.get(f"/jobs/{view['id']}")).json()
    assert done["state"] == "succeeded" and done["shards_done"] == shards
    assert done["shard_states"]["done"] == shards and sum(done["shard_states"].values()) == shards
    assert done["bytes_emitted"] == len(DATA)
    assert [shard["index"] for shard in done["shards"]] == list(range(SHARDS_PAGE_DEFAULT))

    page = await (await http.get(f"/jobs/{view['id']}/shards?offset=240&limit=7")).json()
    assert [shard["index"] for shard in page["shards"]] == list(range(240, 247))
    assert page["next_offset"] == 247 and page["shards_total"] == shards and page["offset"] == 240
    last = await (await http.get(f"/jobs/{view['id']}/shards?offset=247&limit=7")).json()
    assert [shard["index"] for shard in last["shards"]] == [247, 248, 249] and last["next_offset"] is None
    beyond = await (await http.get(f"/jobs/{view['id']}/shards?offset=9999")).json()
    assert beyond["shards"] == [] and beyond["next_offset"] is None

    async with CoordinatorClient(_url(http)) as api:
        every = await api.job_with_shards(view["id"])
    assert [shard["index"] for shard in every["shards"]] == list(range(shards))
    assert every["shards"][-1]["emitted"][1] == len(DATA)
    assert sum(shard["bytes"] for shard in every["shards"]) == len(DATA)


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("limit=1001", "'limit': at most 1000"),
        ("limit=-1", "'limit': expected an integer >= 0"),
        ("offset=x", "'offset': expected an integer >= 0"),
    ],
)
async def test_a_bad_shard_page_is_refused_naming_the_parameter(http, source, query, message):
    view = await (await http.post("/jobs", json={"source": source, "shards": 2})).json()
    response = await http.get(f"/jobs/{view['id']}/shards?{query}")
    assert response.status == 400
    assert message in (await response.json())["error"]
    missing = await http.get("/jobs/nosuchjob/shards")
    assert missing.status == 404


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"{not json", "request body"),
        (b"[1, 2]", "request body"),
        (b'{"shards": 2}', "'source'"),
        (b'{"source": "x", "shards": 0}', "'shards'"),
        (b'{"source": "x", "shards": 2, "bogus": 1}', "'bogus'"),
        (b'{"source": "x", "shards": 2, "delimiter": "ab"}', "'delimiter'"),
        (b'{"source": "x", "shards": 2, "timeouts": {"start_s": -1}}', "'timeouts.start_s'"),
        (b'{"source": "x", "shards": 2, "command": "  "}', "'command'"),
        (b'{"source": "SOURCE", "shards": 2, "backend": "nope"}', "'backend'"),
        (b'{"source": "x", "shards": 2, "output": "/o", "overwrite": "yes"}', "'overwrite'"),
        (b'{"source": "x", "shards": 2, "overwrite": true}', "'overwrite'"),
        # Booleans are never numbers, though Python's True is an int.
        (b'{"source": "x", "shards": true}', "'shards'"),
        (b'{"source": "x", "shards": 2, "max_attempts": true}', "'max_attempts'"),
        (b'{"source": "x", "shards": 2, "max_line_bytes": true}', "'max_line_bytes'"),
        (b'{"source": "x", "shards": 2, "part_size_bytes": true}', "'part_size_bytes'"),
        (b'{"source": "x", "shards": 2, "timeouts": {"total_s": true}}', "'timeouts.total_s'"),
        (b'{"source": "x", "shards": 2.0}', "'shards'"),
        # Not JSON, or JSON that Python would take but should not.
        (b'{"source": "x", "shards": NaN}', "NaN is not a JSON number"),
        (b'{"source": "x", "timeouts": {"total_s": Infinity}, "shards": 1}', "Infinity is not a JSON number"),
        (b'{"source": ' + b"[" * 20_000 + b"]" * 20_000 + b', "shards": 1}', "request body: JSON nested too deeply"),
        (b'{"source": "x", "shards": ' + b"7" * 5000 + b"}", "request body: not valid JSON"),
        (b'{"source": "\xff", "shards": 1}', "request body: not UTF-8"),
    ],
)
async def test_invalid_request_is_400_naming_the_field(http, source, body, field):
    response = await http.post(
        "/jobs", data=body.replace(b"SOURCE", source.encode()), headers={"Content-Type": "application/json"}
    )
    assert response.status == 400
    assert field in (await response.json())["error"]


@pytest.mark.parametrize(
    ("fields", "field", "limit"),
    [
        ({"shards": 10**7}, "'shards'", "100000"),
        ({"shards": 10**400}, "'shards'", "100000"),
        ({"max_attempts": 10**9}, "'max_attempts'", "10"),
        ({"timeouts": {"start_s": 1e300}}, "'timeouts.start_s'", "604800"),
        ({"timeouts": {"heartbeat_s": 1e300}}, "'timeouts.heartbeat_s'", "604800"),
        ({"timeouts": {"total_s": 1e300}}, "'timeouts.total_s'", "604800"),
        ({"part_size_bytes": 2**40, "max_in_flight_bytes": 2**41}, "'part_size_bytes'", "268435456"),
        ({"max_in_flight_bytes": 2**31}, "'max_in_flight_bytes'", "1073741824"),
    ],
)
async def test_fields_above_the_default_limits_are_400(coordinator, http, source, fields, field, limit):
    response = await http.post("/jobs", json={"source": source, "shards": 2, **fields})
    assert response.status == 400
    message = (await response.json())["error"]
    assert field in message and f"limit of {limit} " in message, message
    assert len(message) < 300  # a huge number is abridged, not echoed
    assert coordinator.views() == []  # nothing was submitted


async def test_job_limits_are_the_operators(aws_settings, marker_table, tmp_path, source):
    async with in_process_coordinator(aws_settings, tmp_path / "spool", job_limits=JobLimits(max_shards=3)) as service:
        http = await _serve(service)
        try:
            refused = await http.post("/jobs", json={"source": source, "shards": 4})
            assert refused.status == 400 and "limit of 3 " in (await refused.json())["error"]
            accepted = await http.post("/jobs", json={"source": source, "shards": 3})
            assert accepted.status == 201
            output = await http.get(f"/jobs/{(await accepted.json())['id']}/output")
            assert await output.read() == DATA
        finally:
            await http.close()


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None]
)
async def test_a_body_that_is_not_json_is_415(coordinator, http, source, content_type):
    # What a web page may send anywhere without asking (a "simple" request).
    body = json.dumps({"source": source, "shards": 1, "command": "id"}).encode()
    headers = {"Content-Type": content_type} if content_type else {}
    response = await http.post("/jobs", data=body, headers=headers)
    assert response.status == 415
    assert "application/json" in (await response.json())["error"]
    assert coordinator.views() == []  # nothing was submitted


async def test_json_with_a_charset_is_json(http, source):
    body = json.dumps({"source": source, "shards": 1}).encode()
    response = await http.post("/jobs", data=body, headers={"Content-Type": "application/json; charset=utf-8"})
    assert response.status == 201, await response.text()


async def test_missing_source_is_400_and_an_input_error(http, tmp_path):
    missing = str(tmp_path / "nope.txt")
    response = await http.post("/jobs", json={"source": missing, "shards": 2})
    assert response.status == 400
    assert "no such file" in (await response.json())["error"]
    async with CoordinatorClient(_url(http)) as api:
        with pytest.raises(InputError, match="no such file"):
            await api.submit(JobSpec(source=missing, shards=2))


@pytest.mark.parametrize(
    ("method", "path"), [("GET", "/jobs/nope"), ("DELETE", "/jobs/nope"), ("GET", "/jobs/nope/output")]
)
async def test_unknown_job_is_404(http, method, path):
    response = await http.request(method, path)
    assert response.status == 404
    assert "nope" in (await response.json())["error"]


async def test_unknown_job_through_the_client(http):
    async with CoordinatorClient(_url(http)) as api:
        with pytest.raises(JobNotFoundError, match="nope"):
            await api.job("nope")
        with pytest.raises(JobNotFoundError):
            await api.cancel("nope")
        with pytest.raises(JobNotFoundError):
            [chunk async for chunk in api.output("nope")]


async def test_unknown_route_and_method_answer_json(http):
    response = await http.get("/nowhere")
    assert response.status == 404 and "error" in await response.json()
    response = await http.put("/jobs")
    assert response.status == 405 and "GET" in response.headers["Allow"]


async def test_cancel_running_job(http, source):
    # Every shard blocks until it is stopped: the job cannot finish by itself.
    response = await http.post("/jobs", json={"source": source, "shards": 2, "command": "sleep 600", "max_attempts": 1})
    job_id = (await response.json())["id"]
    response = await http.delete(f"/jobs/{job_id}")
    assert response.status == 200
    assert (await response.json())["state"] == "cancelled"
    # Cancelled before any byte of output: 409 with the reason.
    output = await http.get(f"/jobs/{job_id}/output")
    assert output.status == 409
    assert "cancel" in (await output.json())["error"]
    async with CoordinatorClient(_url(http)) as api:
        with pytest.raises(JobCancelledError):
            [chunk async for chunk in api.output(job_id)]
        again = await api.cancel(job_id)  # a final job is returned unchanged
        assert again["state"] == "cancelled"


async def test_job_failing_mid_stream_aborts_the_response(http, source, tmp_path):
    """Shard 0 succeeds at once; shard 1 fails only after the client has
    received shard 0's bytes, so the response is already under way."""
    go = tmp_path / "go"
    command = f'if [ "$SHARDLINE_SHARD" = 0 ]; then cat; else while [ ! -e {go} ]; do sleep 0.05; done; exit 3; fi'
    response = await http.post("/jobs", json={"source": source, "shards": 2, "command": command, "max_attempts": 1})
    job_id = (await response.json())["id"]

    output = await http.get(f"/jobs/{job_id}/output")
    assert output.status == 200
    received = await output.content.readany()
    assert received and DATA.startswith(received)
    go.touch()
    with pytest.raises(aiohttp.ClientPayloadError):
        await output.read()

    view = await (await http.get(f"/jobs/{job_id}")).json()
    assert view["state"] == "failed" and "status 3" in view["error"]
    # The client turns an aborted stream into the job's error.
    go.unlink()
    response = await http.post("/jobs", json={"source": source, "shards": 2, "command": command, "max_attempts": 1})
    job_id = (await response.json())["id"]
    async with CoordinatorClient(_url(http)) as api:
        chunks = []
        with pytest.raises(JobFailedError, match="status 3"):
            async for chunk in api.output(job_id):
                chunks.append(chunk)
                go.touch()
        assert DATA.startswith(b"".join(chunks))


async def test_token_required_on_every_route_but_healthz(coordinator, source):
    http = await _serve(coordinator, token=TOKEN)
    try:
        paths = ["/metrics", "/openapi.json", "/jobs", "/jobs/x", "/jobs/x/shards", "/jobs/x/output"]
        for path in paths:
            response = await http.get(path)
            assert response.status == 401, path
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
        wrong = await http.post("/jobs", json={"source": source, "shards": 1}, headers={"Authorization": "Bearer no"})
        assert wrong.status == 401
        assert (await http.get("/jobs", headers={"Authorization": TOKEN})).status == 401  # no scheme
        assert (await http.get("/jobs", headers={"Authorization": f"Basic {TOKEN}"})).status == 401
        # The scheme is case-insensitive (RFC 7235).
        for scheme in ("Bearer", "bearer", "BEARER"):
            right = await http.get("/jobs", headers={"Authorization": f"{scheme} {TOKEN}"})
            assert right.status == 200, scheme
        # A probe needs no token, and learns nothing but "ok".
        health = await http.get("/healthz")
        assert (health.status, await health.json()) == (200, {"status": "ok"})

        async with CoordinatorClient(_url(http)) as api:
            with pytest.raises(ConfigurationError, match="--token-file"):
                await api.jobs()
        async with CoordinatorClient(_url(http), token=TOKEN) as api:
            assert await api.jobs() == []
    finally:
        await http.close()


async def test_healthz_and_draining(coordinator, http, source):
    response = await http.get("/healthz")
    assert response.status == 200 and await response.json() == {"status": "ok"}
    await coordinator.drain(1.0)
    response = await http.get("/healthz")
    assert response.status == 503 and await response.json() == {"status": "draining"}
    response = await http.post("/jobs", json={"source": source, "shards": 1})
    assert response.status == 503
    async with CoordinatorClient(_url(http)) as api:
        with pytest.raises(NotAcceptingJobsError):
            await api.submit(JobSpec(source=source, shards=1))


async def test_metrics_in_prometheus_text_format(http, source):
    response = await http.post("/jobs", json={"source": source, "shards": 2})
    job_id = (await response.json())["id"]
    assert await (await http.get(f"/jobs/{job_id}/output")).read() == DATA
    response = await http.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = await response.text()
    for family in (
        "shardline_jobs",
        "shardline_shards",
        "shardline_retries_total",
        "shardline_bytes_emitted_total",
        "shardline_boundary_path_total",
        "shardline_handshake_wait_seconds",
    ):
        assert f"# TYPE {family} " in text, family
    assert 'shardline_jobs{state="succeeded"} 1' in text
    # Local workers' outputs are already on the coordinator's disk: nothing relayed, nothing copied.
    for sample in (
        'relayed_bytes_total{way="fetched"} 0',
        'relayed_bytes_total{way="uploaded"} 0',
        "copied_bytes_total 0",
    ):
        assert f"shardline_output_{sample}\n" in text, sample


def _documented_routes(document: dict) -> set[tuple[str, str]]:
    methods = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
    return {(method.upper(), path) for path, item in document["paths"].items() for method in item if method in methods}


async def test_openapi_validates_and_matches_the_routes(coordinator, http):
    document = openapi_document()
    validate(document)  # raises if it is not a valid OpenAPI 3 document
    app = make_app(coordinator, access=HttpAccess(token=None))
    served = {(route.method, route.resource.canonical) for route in app.router.routes() if route.resource is not None}
    assert served == _documented_routes(document)

    response = await http.get("/openapi.json")
    assert response.status == 200
    assert await response.json() == document


def test_openapi_file_is_package_data():
    # Installed wheels must carry it: pyproject lists it as package data.
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert '"shardline.coordinator" = ["openapi.json"]' in pyproject
    assert json.loads((Path(__file__).resolve().parents[2] / "src/shardline/coordinator/openapi.json").read_text())


async def test_client_disconnect_mid_stream_leaves_the_coordinator_serving(http, source, tmp_path):
    go = tmp_path / "go"
    command = f'if [ "$SHARDLINE_SHARD" = 0 ]; then cat; else while [ ! -e {go} ]; do sleep 0.05; done; cat; fi'
    response = await http.post("/jobs", json={"source": source, "shards": 2, "command": command})
    job_id = (await response.json())["id"]
    output = await http.get(f"/jobs/{job_id}/output")
    assert await output.content.readany()
    output.close()  # the reader goes away mid-stream
    go.touch()
    # The job still finishes and a new reader gets the whole output.
    again = await http.get(f"/jobs/{job_id}/output")
    assert await again.read() == DATA
    assert (await (await http.get("/healthz")).json())["status"] == "ok"


# -- storage failing at submit time ------------------------------------------------------


@pytest.fixture
async def proxied_s3(moto, marker_table, tmp_path):
    """A coordinator whose S3 requests (not DynamoDB's) go through a fault proxy, with a short read timeout."""
    async with FaultProxy(moto.url, seed=3) as proxy:
        aws = moto.aws_settings(s3_endpoint_url=proxy.url, read_timeout_s=1.0)
        async with in_process_coordinator(aws, tmp_path / "spool") as service:
            http = await _serve(service)
            try:
                yield proxy, http
            finally:
                await http.close()


async def test_a_transient_head_failure_at_submit_is_retried(proxied_s3, s3, bucket):
    proxy, http = proxied_s3
    s3.put_object(Bucket=bucket, Key="input.txt", Body=DATA)
    proxy.set_rules(
        [
            Rule(method="HEAD", fault=s3_internal_error(), times=1),
            Rule(method="HEAD", fault=s3_slow_down(), times=1),
            Rule(method="HEAD", fault=Delay(delay_s=3.0), times=1),  # longer than the read timeout
        ]
    )
    response = await http.post("/jobs", json={"source": f"s3://{bucket}/input.txt", "shards": 3})
    assert response.status == 201, await response.text()
    assert proxy.applied == [1, 1, 1]
    heads = [record for record in proxy.records if record.method == "HEAD"]
    assert len(heads) == 4  # three faults, then the answer
    output = await http.get(f"/jobs/{(await response.json())['id']}/output")
    assert await output.read() == DATA


async def test_a_storage_failure_that_persists_is_503_with_retry_after(proxied_s3, s3, bucket):
    proxy, http = proxied_s3
    s3.put_object(Bucket=bucket, Key="input.txt", Body=DATA)
    proxy.set_rules([Rule(method="HEAD", fault=s3_slow_down())])
    spec = {"source": f"s3://{bucket}/input.txt", "shards": 3}
    response = await http.post("/jobs", json=spec)
    assert response.status == 503
    assert int(response.headers["Retry-After"]) > 0
    message = (await response.json())["error"]
    assert f"s3://{bucket}/input.txt" in message and "gave up after" in message, message
    assert proxy.applied[0] >= 2  # it was retried
    async with CoordinatorClient(_url(http)) as api:
        with pytest.raises(RetryableStorageError, match="try again in"):
            await api.submit(JobSpec(**spec))
    # Storage that answers, but no: still the client's problem (400).
    proxy.set_rules([])
    response = await http.post("/jobs", json={**spec, "source": f"s3://{bucket}/missing.txt"})
    assert response.status == 400


async def test_a_unique_prefix_names_a_job_and_an_ambiguous_one_lists_the_candidates(http, source):
    # 17 ids of hex digits: two of them surely start with the same digit.
    ids = []
    for _ in range(17):
        response = await http.post("/jobs", json={"source": source, "shards": 1})
        assert response.status == 201
        ids.append((await response.json())["id"])
    shared = next(digit for digit in "0123456789abcdef" if sum(i.startswith(digit) for i in ids) >= 2)
    ambiguous = await http.get(f"/jobs/{shared}")
    assert ambiguous.status == 400
    message = (await ambiguous.json())["error"]
    assert f"job id prefix '{shared}' is ambiguous" in message
    assert all(i in message for i in ids if i.startswith(shared))

    job_id = ids[0]
    prefix = next(job_id[:k] for k in range(1, 17) if sum(i.startswith(job_id[:k]) for i in ids) == 1)
    assert len(prefix) < len(job_id)
    async with CoordinatorClient(_url(http)) as api:
        assert (await api.job(prefix))["id"] == job_id
        assert b"".join([chunk async for chunk in api.output(prefix)]) == DATA
        with pytest.raises(InputError, match="ambiguous"):
            await api.cancel(shared)
    assert (await http.delete(f"/jobs/{prefix}")).status == 200  # finished already: returned as it is
