"""deploy/template.yaml: cfn-lint, least-privilege IAM, and names that must match the code.

The template is read with a small YAML loader that turns CloudFormation's
short tags (!Ref, !Sub, !GetAtt, ...) into their long forms, so the checks
see exactly what is written.  The worker's and coordinator's DynamoDB
actions are compared with the calls the code makes, found by scanning the
source, so a new call without its permission fails here and not on AWS.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from shardline.io.store import JOBS_INDEX_ATTRIBUTES, JOBS_INDEX_DEFINITION
from shardline.protocol import MARKER_ATTRIBUTE_DEFINITIONS, MARKER_KEY_SCHEMA, MARKER_TTL_ATTRIBUTE

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
TEMPLATE = DEPLOY / "template.yaml"
SRC = ROOT / "src" / "shardline"

HANDLER = "shardline.worker.lambda_handler.handler"

#: Exactly what the worker's role may do; anything more is a finding.
WORKER_ACTIONS = {
    "s3:GetObject",
    "s3:PutObject",
    "s3:AbortMultipartUpload",
    "dynamodb:GetItem",
    "dynamodb:UpdateItem",
    "dynamodb:DeleteItem",  # an expired marker, met while publishing
    "logs:CreateLogStream",
    "logs:PutLogEvents",
}

#: Calls that only create a table; the template creates the tables instead.
TABLE_CREATION_CALLS = {"create_table", "update_time_to_live"}


# --- loading -------------------------------------------------------------------------


class _CfnLoader(yaml.SafeLoader):
    """SafeLoader plus CloudFormation's short-form intrinsic functions."""


def _intrinsic(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    name = "Ref" if suffix == "Ref" else f"Fn::{suffix}"
    if isinstance(node, yaml.ScalarNode):
        value: Any = loader.construct_scalar(node)
        if suffix == "GetAtt":  # !GetAtt Resource.Attribute
            value = value.split(".", 1)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    return {name: value}


_CfnLoader.add_multi_constructor("!", _intrinsic)


def load_template(path: Path | None = None) -> dict[str, Any]:
    document = yaml.load((path or TEMPLATE).read_text(encoding="utf-8"), Loader=_CfnLoader)
    assert isinstance(document, dict)
    return document


def _resources(template: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {name: r for name, r in template["Resources"].items() if r["Type"] == kind}


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _policy_documents(template: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, document) for every IAM policy document in the template."""
    for name, resource in template["Resources"].items():
        properties = resource.get("Properties", {})
        if resource["Type"] == "AWS::IAM::Role":
            for policy in properties.get("Policies", []):
                yield f"{name}/{policy['PolicyName']}", policy["PolicyDocument"]
        elif resource["Type"] in ("AWS::IAM::ManagedPolicy", "AWS::IAM::Policy"):
            yield name, properties["PolicyDocument"]
        elif resource["Type"] == "AWS::Serverless::Function":
            assert "Policies" not in properties, f"{name}: give the function an explicit Role, not SAM Policies"


def _statements(document: dict[str, Any]) -> list[dict[str, Any]]:
    return _as_list(document["Statement"])


def _resource_text(resource: Any) -> str | None:
    """A Resource as written: a string, the template of a !Sub, or None for !GetAtt/!Ref (exact resources)."""
    if isinstance(resource, str):
        return resource
    if isinstance(resource, dict) and "Fn::Sub" in resource:
        sub = resource["Fn::Sub"]
        return sub if isinstance(sub, str) else sub[0]
    if isinstance(resource, dict) and set(resource) <= {"Fn::GetAtt", "Ref"}:
        return None
    raise AssertionError(f"unexpected Resource form {resource!r}")


def _source_calls(*paths: Path, client: str) -> set[str]:
    """Method names called on a `client` (or `_client`) object in these files."""
    pattern = re.compile(rf"\b_?{client}\.([a-z_]+)\b")
    return {m for path in paths for m in pattern.findall(path.read_text(encoding="utf-8"))}


def _camel(call: str) -> str:
    return "".join(part.capitalize() for part in call.split("_"))


#: API calls that IAM does not name as actions: what each needs granted instead.
_IAM_ACTIONS_OF = {"transact_write_items": {"PutItem", "UpdateItem", "ConditionCheckItem"}}


def _iam_actions(calls: set[str]) -> set[str]:
    """The IAM actions (without the service prefix) that `calls` need."""
    return {action for call in calls for action in _IAM_ACTIONS_OF.get(call, {_camel(call)})}


# --- cfn-lint ----------------------------------------------------------------------------


def _cfn_lint() -> str:
    candidate = Path(sys.executable).parent / "cfn-lint"
    found = str(candidate) if candidate.is_file() else shutil.which("cfn-lint")
    assert found, "cfn-lint is not installed: pip install -e '.[test]'"
    return found


def test_templates_pass_cfn_lint() -> None:
    templates = sorted(DEPLOY.glob("*.yaml"))
    assert TEMPLATE in templates
    result = subprocess.run([_cfn_lint(), *map(str, templates)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, f"cfn-lint found problems:\n{result.stdout}{result.stderr}"


def test_sam_transform_output_passes_cfn_lint(tmp_path: Path) -> None:
    """The template as CloudFormation will see it after the SAM transform (as
    `sam package` leaves it: CodeUri on S3), linted against the plain
    AWS::Lambda schemas."""
    pytest.importorskip("samtranslator", reason="aws-sam-translator is not installed")
    import boto3
    from samtranslator.parser.parser import Parser
    from samtranslator.translator.translator import Translator

    document = json.loads(json.dumps(load_template()))
    document["Resources"]["WorkerFunction"]["Properties"]["CodeUri"] = "s3://example-artifacts/shardline-worker.zip"
    # The region only fills in AWS::Region and AWS::Partition; nothing is called.
    session = boto3.session.Session(region_name="us-east-1")
    transformed = Translator({}, Parser(), boto_session=session).translate(document, parameter_values={})
    kinds = {resource["Type"] for resource in transformed["Resources"].values()}
    assert "AWS::Lambda::EventInvokeConfig" in kinds and "AWS::Lambda::Function" in kinds
    path = tmp_path / "transformed.json"
    path.write_text(json.dumps(transformed))
    result = subprocess.run([_cfn_lint(), str(path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"cfn-lint on the transformed template:\n{result.stdout}{result.stderr}"


# --- IAM -----------------------------------------------------------------------------------


def test_no_wildcard_actions_or_resources() -> None:
    template = load_template()
    documents = list(_policy_documents(template))
    assert len(documents) >= 2
    for where, document in documents:
        for statement in _statements(document):
            sid = f"{where}:{statement.get('Sid', '?')}"
            assert statement["Effect"] == "Allow", sid
            for forbidden in ("NotAction", "NotResource", "NotPrincipal"):
                assert forbidden not in statement, f"{sid}: {forbidden}"
            for action in _as_list(statement["Action"]):
                assert isinstance(action, str) and re.fullmatch(r"[a-z0-9-]+:[A-Za-z0-9]+", action), (
                    f"{sid}: action {action!r} is not one exact action"
                )
            for resource in _as_list(statement["Resource"]):
                text = _resource_text(resource)
                if text is None:
                    continue
                assert text != "*", f"{sid}: Resource '*'"
                # A `*` may only end an object-key prefix under a named bucket.
                if "*" in text:
                    assert text.count("*") == 1 and text.endswith("*"), f"{sid}: {text!r}"
                    assert re.fullmatch(r"arn:\$\{AWS::Partition\}:s3:::\$\{\w+\}/[^*]*\*", text), (
                        f"{sid}: wildcard outside an object-key prefix: {text!r}"
                    )


def test_worker_role_has_exactly_the_worker_actions() -> None:
    template = load_template()
    function = template["Resources"]["WorkerFunction"]["Properties"]
    assert function["Role"] == {"Fn::GetAtt": ["WorkerRole", "Arn"]}
    role = template["Resources"]["WorkerRole"]["Properties"]
    assert "ManagedPolicyArns" not in role
    statements = [s for policy in role["Policies"] for s in _statements(policy["PolicyDocument"])]
    actions = {action for s in statements for action in _as_list(s["Action"])}
    assert actions == WORKER_ACTIONS
    for statement in statements:
        for action in _as_list(statement["Action"]):
            if action.startswith("dynamodb:"):
                # The worker never touches the jobs table.
                assert statement["Resource"] == {"Fn::GetAtt": ["MarkersTable", "Arn"]}, statement
            if action in ("s3:PutObject", "s3:AbortMultipartUpload"):
                assert _resource_text(statement["Resource"]).endswith("${OutputPrefix}staging/*"), statement


def test_worker_dynamodb_actions_match_the_worker_code() -> None:
    calls = _source_calls(SRC / "io" / "store" / "_dynamomarkers.py", client="dynamodb")
    assert calls, "no DynamoDB calls found in the marker store"
    role = load_template()["Resources"]["WorkerRole"]["Properties"]
    granted = {
        a.removeprefix("dynamodb:")
        for policy in role["Policies"]
        for s in _statements(policy["PolicyDocument"])
        for a in _as_list(s["Action"])
        if a.startswith("dynamodb:")
    }
    assert {_camel(call) for call in calls} == granted


def test_coordinator_policy_covers_the_coordinator_code() -> None:
    template = load_template()
    statements = _statements(template["Resources"]["CoordinatorPolicy"]["Properties"]["PolicyDocument"])

    def granted(table: str) -> set[str]:
        return {
            a.removeprefix("dynamodb:")
            for s in statements
            if s["Resource"] == {"Fn::GetAtt": [table, "Arn"]}
            for a in _as_list(s["Action"])
        }

    coordinator = _iam_actions(
        _source_calls(SRC / "io" / "store" / "_dynamojobs.py", SRC / "io" / "store" / "_tables.py", client="dynamodb")
        - TABLE_CREATION_CALLS
    )
    worker = _source_calls(SRC / "io" / "store" / "_dynamomarkers.py", client="dynamodb")
    assert coordinator and worker
    # Both tables share the store's calls' superset; the markers table also
    # serves the workers the coordinator runs itself (local backend).
    assert coordinator <= granted("JobsTable") | granted("MarkersTable")
    assert {_camel(c) for c in worker} | {"DescribeTable", "UpdateItem"} <= granted("MarkersTable")
    assert "DescribeTable" in granted("JobsTable")

    actions = {a for s in statements for a in _as_list(s["Action"])}
    assert "lambda:InvokeFunction" in actions
    invoke = next(s for s in statements if s["Action"] == "lambda:InvokeFunction")
    assert invoke["Resource"] == {"Fn::GetAtt": ["WorkerFunction", "Arn"]}
    # Listing is only ever by prefix.
    for statement in statements:
        if statement["Action"] == "s3:ListBucket":
            assert "s3:prefix" in statement["Condition"]["StringLike"], statement


# --- names shared with the code --------------------------------------------------------


def test_tables_match_the_protocol_schema() -> None:
    tables = _resources(load_template(), "AWS::DynamoDB::Table")
    assert set(tables) == {"MarkersTable", "JobsTable"}
    for name, table in tables.items():
        properties = table["Properties"]
        assert properties["KeySchema"] == MARKER_KEY_SCHEMA, name
        index = JOBS_INDEX_ATTRIBUTES if name == "JobsTable" else []
        assert properties["AttributeDefinitions"] == MARKER_ATTRIBUTE_DEFINITIONS + index, name
        assert properties.get("GlobalSecondaryIndexes", []) == ([JOBS_INDEX_DEFINITION] if index else []), name
        assert properties["BillingMode"] == "PAY_PER_REQUEST", name
        assert properties["TimeToLiveSpecification"] == {"AttributeName": MARKER_TTL_ATTRIBUTE, "Enabled": True}


def test_worker_function_settings() -> None:
    template = load_template()
    function = template["Resources"]["WorkerFunction"]["Properties"]
    assert function["Handler"] == HANDLER
    module = HANDLER.rsplit(".", 1)[0]
    assert importlib.util.find_spec(module) is not None, f"handler module {module} is missing"
    assert function["Runtime"] == "python3.11"
    # The coordinator owns retries: Lambda must never re-run an attempt by itself.
    assert function["EventInvokeConfig"]["MaximumRetryAttempts"] == 0
    assert function["EventInvokeConfig"]["MaximumEventAgeInSeconds"] <= 300
    assert "SHARDLINE_LAMBDA_RESERVE_MS" in function["Environment"]["Variables"]
    parameters = template["Parameters"]
    assert parameters["Architecture"]["AllowedValues"] == ["x86_64", "arm64"]
    assert (parameters["EphemeralStorage"]["MinValue"], parameters["EphemeralStorage"]["MaxValue"]) == (512, 10240)
    assert set(template["Outputs"]) >= {
        "WorkerFunctionArn",
        "MarkersTableName",
        "JobsTableName",
        "CoordinatorPolicyArn",
        "StagingUrl",
    }
