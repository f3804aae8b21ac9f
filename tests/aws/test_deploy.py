"""deploy/ kept in step with the code: the Dockerfiles' pins against pyproject.toml, the worker
task definition against botocore's ECS model and the launcher, dagster.yaml against Dagster's
instance schema, and the aws resources built from environment variables (no Docker, no AWS)."""

from __future__ import annotations

import json
import re
import shlex
import tomllib

import pytest
import yaml
from botocore.exceptions import ParamValidationError
from botocore.session import get_session
from botocore.validate import validate_parameters
from dagster import Definitions, EnvVar
from dagster._config import process_config
from dagster._core.instance.config import dagster_instance_config
from dagster_aws.ecs import EcsRunLauncher
from dagster_aws.s3 import S3Resource

from geofm_assets.paths import REPO_ROOT
from geofm_assets.resources.aws import EARTH_SEARCH, MissingSettingError, aws_resources
from geofm_assets.resources.encoder import WORKER_MODULE, EcsEmbeddingLauncher
from geofm_assets.resources.s3_lake import S3LakeResource
from geofm_assets.resources.vector_store import VectorStoreResource

DEPLOY = REPO_ROOT / "deploy"
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
PINS = dict(
    re.match(r"([A-Za-z0-9_.\-\[\]]+)==(\S+)", d).groups()  # type: ignore[union-attr]
    for d in PYPROJECT["project"]["dependencies"]
)


def dockerfile_instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (DEPLOY / name).read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def pip_installs(name: str) -> list[list[str]]:
    return [shlex.split(args)[2:] for word, args in dockerfile_instructions(name)
            if word == "RUN" and args.startswith("pip install")]


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.worker"])
def test_dockerfiles_install_torch_first_then_the_package_as_pinned(name):
    base = [args for word, args in dockerfile_instructions(name) if word == "FROM"]
    assert base == ["python:3.11-slim"]
    assert PYPROJECT["project"]["requires-python"] == ">=3.11,<3.13"
    installs = pip_installs(name)
    torch_pins = [a for a in installs[0] if a.startswith("torch")]
    assert torch_pins == [f"torch=={PINS['torch']}"], "torch goes first, alone, pinned as pyproject"
    assert installs[1:] == [["."]], "then the package itself, with pyproject.toml's exact pins"
    copied = [args for word, args in dockerfile_instructions(name) if word == "COPY"]
    assert "pyproject.toml README.md ./" in copied and "geofm_assets ./geofm_assets" in copied


def test_the_user_code_image_takes_cpu_torch_and_the_worker_image_cuda_torch():
    user, worker = pip_installs("Dockerfile")[0], pip_installs("Dockerfile.worker")[0]
    assert "https://download.pytorch.org/whl/cpu" in user
    assert not any("index-url" in a or "download.pytorch.org" in a for a in worker)  # PyPI: CUDA


def test_pyproject_pins_every_runtime_dependency():
    unpinned = [d for d in PYPROJECT["project"]["dependencies"] if "==" not in d]
    assert not unpinned
    assert {"dagster-aws", "dagster-postgres", "torch"} <= set(PINS)


def test_the_images_run_what_dagster_and_pipes_expect():
    user_cmd = [json.loads(args) for word, args in dockerfile_instructions("Dockerfile") if word == "CMD"]
    assert user_cmd == [["dagster", "code-server", "start", "-h", "0.0.0.0", "-p", "4000",
                         "-m", PYPROJECT["tool"]["dagster"]["module_name"]]]
    worker_cmd = [json.loads(a) for w, a in dockerfile_instructions("Dockerfile.worker") if w == "CMD"]
    launcher = EcsEmbeddingLauncher(cluster="c", task_definition="t")
    override = launcher.run_task_params()["overrides"]["containerOverrides"][0]
    assert worker_cmd == [override["command"]] == [["python", "-m", WORKER_MODULE]]


@pytest.fixture(scope="module")
def task_definition() -> dict:
    return json.loads((DEPLOY / "ecs-worker-task.json").read_text())


def test_the_worker_task_definition_is_a_valid_ecs_request(task_definition):
    shape = get_session().get_service_model("ecs").operation_model("RegisterTaskDefinition").input_shape
    validate_parameters(task_definition, shape)
    broken = {**task_definition, "containerDefinitions": [{"name": 3}]}
    with pytest.raises(ParamValidationError):
        validate_parameters(broken, shape)


def test_the_worker_task_has_a_gpu_logs_pipes_can_read_and_no_inline_secrets(task_definition):
    (container,) = task_definition["containerDefinitions"]
    launcher = EcsEmbeddingLauncher(cluster="c", task_definition="t")
    assert container["name"] == launcher.container_name
    assert container["command"] == ["python", "-m", WORKER_MODULE]
    assert {"type": "GPU", "value": "1"} in container["resourceRequirements"]
    assert "EC2" in task_definition["requiresCompatibilities"]  # Fargate has no GPUs
    # PipesCloudWatchMessageReader finds the stream from these two options
    logs = container["logConfiguration"]
    assert logs["logDriver"] == "awslogs"
    assert {"awslogs-group", "awslogs-stream-prefix"} <= set(logs["options"])
    secretish = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL", re.I)
    assert not [e["name"] for e in container["environment"] if secretish.search(e["name"])]
    for secret in container["secrets"]:
        assert re.match(r"arn:aws:(secretsmanager|ssm):", secret["valueFrom"]), secret


@pytest.fixture
def deploy_config(tmp_path, monkeypatch) -> dict:
    home = tmp_path / "deploy_home"
    home.mkdir()
    (home / "dagster.yaml").write_text((DEPLOY / "dagster.yaml").read_text())
    env = {"DAGSTER_PG_HOST": "db", "DAGSTER_PG_PORT": "5432", "DAGSTER_PG_DB": "dagster",
           "DAGSTER_PG_USERNAME": "dagster", "DAGSTER_PG_PASSWORD": "x",
           "DAGSTER_PG_PASSWORD_SECRET_ARN": "arn:aws:secretsmanager:us-west-2:1:secret:pg",
           "GEOFM_LAKE_BUCKET": "lake"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config, _ = dagster_instance_config(str(home))
    return config


def test_the_deploy_instance_config_is_valid(deploy_config):
    assert set(deploy_config["storage"]) == {"postgres"}
    db = yaml.safe_load((DEPLOY / "dagster.yaml").read_text())["storage"]["postgres"]["postgres_db"]
    for field in ("hostname", "db_name", "username", "password"):
        assert set(db[field]) == {"env"}, f"postgres {field} must come from the environment"
    assert deploy_config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert deploy_config["concurrency"]["pools"]["default_limit"] == 1
    launcher = deploy_config["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("dagster_aws.ecs", "EcsRunLauncher")
    result = process_config(EcsRunLauncher.config_type(), launcher["config"])
    assert result.success, result.errors
    assert all(set(s["valueFrom"]) == {"env"} for s in launcher["config"]["secrets"])


def test_every_variable_the_aws_resources_read_reaches_the_run_tasks(deploy_config):
    passed = set(deploy_config["run_launcher"]["config"]["env_vars"])
    required = {"GEOFM_LAKE_BUCKET", "GEOFM_ECS_CLUSTER", "GEOFM_ECS_WORKER_TASK_DEFINITION",
                "GEOFM_OPENSEARCH_URL", "GEOFM_ENV"}
    assert required <= passed


AWS_ENV = {
    "GEOFM_LAKE_BUCKET": "geofm-lake",
    "GEOFM_LAKE_PREFIX": "/prod/lake/",
    "GEOFM_ECS_CLUSTER": "geofm",
    "GEOFM_ECS_WORKER_TASK_DEFINITION": "geofm-embed-worker:3",
    "GEOFM_ECS_SUBNETS": "subnet-a, subnet-b",
    "GEOFM_ECS_SECURITY_GROUPS": "sg-1",
    "GEOFM_ECS_CAPACITY_PROVIDER": "gpu-g5",
    "GEOFM_OPENSEARCH_URL": "https://search-geofm.us-west-2.es.amazonaws.com",
    "AWS_REGION": "us-west-2",
}


def test_aws_resources_build_from_the_environment():
    resources = aws_resources(AWS_ENV)
    assert resources["stac"].catalog == EARTH_SEARCH
    lake = resources["lake"]
    assert isinstance(lake, S3LakeResource) and isinstance(lake.s3, S3Resource)
    assert (lake.bucket, lake.prefix, lake.s3.region_name) == ("geofm-lake", "prod/lake", "us-west-2")
    assert lake.s3.aws_secret_access_key is None  # credentials: the task role
    launcher = resources["embedding_launcher"]
    params = launcher.run_task_params()
    assert params["cluster"] == "geofm" and params["taskDefinition"] == "geofm-embed-worker:3"
    assert params["capacityProviderStrategy"] == [{"capacityProvider": "gpu-g5", "weight": 1}]
    assert params["networkConfiguration"]["awsvpcConfiguration"] == {
        "subnets": ["subnet-a", "subnet-b"], "securityGroups": ["sg-1"]}
    store = resources["vector_store"]
    assert isinstance(store, VectorStoreResource)
    assert (store.kind, store.aws_region, store.username) == ("opensearch", "us-west-2", None)
    assert resources["encoder"].device == "auto"
    # and they make a valid Definitions with the project's assets
    from geofm_assets.definitions import ASSETS

    Definitions(assets=ASSETS, resources=resources).resolve_all_job_defs()


def test_opensearch_basic_auth_is_read_at_run_time():
    env = {**AWS_ENV, "GEOFM_OPENSEARCH_USERNAME": "geofm", "GEOFM_OPENSEARCH_PASSWORD": "hunter2"}
    store = aws_resources(env)["vector_store"]
    assert store.password == EnvVar("GEOFM_OPENSEARCH_PASSWORD")  # the name, resolved at run time
    assert "hunter2" not in repr(store)
    with pytest.raises(MissingSettingError, match="GEOFM_OPENSEARCH_PASSWORD is not"):
        aws_resources({**AWS_ENV, "GEOFM_OPENSEARCH_USERNAME": "geofm"})


@pytest.mark.parametrize("missing", ["GEOFM_LAKE_BUCKET", "GEOFM_ECS_CLUSTER",
                                     "GEOFM_ECS_WORKER_TASK_DEFINITION", "GEOFM_OPENSEARCH_URL"])
def test_aws_resources_name_a_missing_variable(missing):
    env = {k: v for k, v in AWS_ENV.items() if k != missing}
    with pytest.raises(MissingSettingError, match=f"GEOFM_ENV=aws needs .*{missing}") as raised:
        aws_resources(env)
    others = {"GEOFM_LAKE_BUCKET", "GEOFM_ECS_CLUSTER", "GEOFM_ECS_WORKER_TASK_DEFINITION",
              "GEOFM_OPENSEARCH_URL"} - {missing}
    assert not any(name in str(raised.value) for name in others)


def test_aws_resources_need_a_region_to_sign_opensearch_requests():
    env = {k: v for k, v in AWS_ENV.items() if k != "AWS_REGION"}
    with pytest.raises(MissingSettingError, match="GEOFM_OPENSEARCH_AWS_REGION or AWS_REGION"):
        aws_resources(env)
    store = aws_resources({**env, "GEOFM_OPENSEARCH_AWS_REGION": "eu-west-1"})["vector_store"]
    assert (store.aws_region, store.aws_service) == ("eu-west-1", "es")
    serverless = {**AWS_ENV, "GEOFM_OPENSEARCH_URL": "https://abc123.us-west-2.aoss.amazonaws.com"}
    assert aws_resources(serverless)["vector_store"].aws_service == "aoss"


def test_aws_resources_read_os_environ_by_default(monkeypatch):
    for name in AWS_ENV:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(MissingSettingError, match="GEOFM_LAKE_BUCKET"):
        aws_resources()
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    assert aws_resources()["lake"].bucket == "geofm-lake"
