"""compose.yaml, the production-shaped deployment: what it must keep across a container's life."""

from __future__ import annotations

from pathlib import Path

import yaml

from app.settings import Settings

COMPOSE = yaml.safe_load((Path(__file__).parents[2] / "compose.yaml").read_text())


def test_the_data_dir_is_a_named_volume() -> None:
    """The decisions JetStream had not acknowledged at a stop are spooled there for the next
    start (app/decision_spool.py): in the container's own layer, recreating it lost them."""
    service = COMPOSE["services"]["tipstream"]
    data_dir = service["environment"]["TIPSTREAM_DATA_DIR"]
    mounted = {volume.split(":")[1]: volume.split(":")[0] for volume in service["volumes"]}
    assert mounted.get(data_dir) in COMPOSE["volumes"], (data_dir, mounted)


def test_the_environment_names_only_real_settings() -> None:
    """A misspelt TIPSTREAM_ variable is ignored by the service, silently."""
    known = {f"TIPSTREAM_{name.upper()}" for name in Settings.model_fields} | {"NATS_URL", "DATABASE_URL"}
    for name, service in COMPOSE["services"].items():
        for variable in service.get("environment", {}):
            if service.get("image", "").startswith("python") or variable.startswith("TIPSTREAM_"):
                assert variable in known, f"{name}: {variable} is not a setting"


def test_the_nats_server_without_auth_is_published_on_loopback_only() -> None:
    """It takes any client: published on every interface, anyone who could reach the host could
    publish events into the streams or delete them, the log the database is rebuilt from."""
    nats = COMPOSE["services"]["nats"]
    assert "--auth" not in nats["command"] and "-c" not in nats["command"]  # else this test may go
    for published in nats["ports"]:
        assert published.startswith("127.0.0.1:"), published


def test_the_service_without_a_token_for_reads_is_published_on_loopback_only() -> None:
    """/score, every user's features and /metrics answer whoever reaches the port: published on every
    interface, anyone who could reach the host read users' features and logged decisions."""
    for published in COMPOSE["services"]["tipstream"]["ports"]:
        assert published.startswith("127.0.0.1:"), published


def test_the_admin_token_comes_from_the_host_s_environment_and_is_never_written_here() -> None:
    """Without it, registry changes and forgetting a user were refused under compose until the file was
    edited, and a token written into it would be in the repository."""
    value = COMPOSE["services"]["tipstream"]["environment"]["TIPSTREAM_ADMIN_TOKEN"]
    assert value == "${TIPSTREAM_ADMIN_TOKEN:-}", value
    assert Settings(admin_token="").admin_token.get_secret_value() == ""  # as compose passes it unset: refused


def test_nats_is_a_release_the_operators_guide_says_was_tested() -> None:
    image = COMPOSE["services"]["nats"]["image"]
    release = image.partition(":")[2]
    guide = (Path(__file__).parents[2] / "docs" / "operations.md").read_text()
    tested = guide.split("\n## Which NATS servers\n")[1].split("\n## ")[0]
    assert f"| {release}" in tested, (f"compose.yaml runs {image}, a release docs/operations.md's 'Which NATS servers' "
                                      "has no row for")
