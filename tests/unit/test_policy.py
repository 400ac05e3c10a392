"""WorkerPool manifests: strict validation that names the file, the field and the reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.errors import PolicyError
from controller.policy import load_pools, parse_duration_s, parse_pools, parse_size_bytes

GOOD = """
apiVersion: shoal/v1
kind: WorkerPool
metadata: {name: default}
spec:
  replicas: {min: 0, max: 4}
  template: {image: shoal/worker:latest, env: {WORK_SECONDS: "3"}, resources: {memory: 128Mi}}
  scaling: {evaluationInterval: 500ms, scaleDown: {stabilizationWindow: 2m}}
"""


def test_a_good_manifest_loads_with_units_converted() -> None:
    [pool] = parse_pools(GOOD, source="pool.yaml")
    assert pool.name == "default"
    assert pool.spec.scaling.evaluation_interval == 0.5
    assert pool.spec.scaling.scale_down.stabilization_window == 120.0
    assert pool.spec.template.resources.memory == 128 * 1024**2


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        pytest.param(("max: 4", "max: -1"), "spec.replicas.max:", id="negative-max"),
        pytest.param(("min: 0", "min: 9"), "min (9) is greater than max (4)", id="min-above-max"),
        pytest.param(
            ("replicas:", "replicaz:"), "spec.replicaz: unknown field", id="unknown-field"
        ),
        pytest.param(("500ms", "-1s"), "spec.scaling.evaluationInterval", id="negative-duration"),
        pytest.param(("500ms", "soon"), "is not a duration", id="bad-duration"),
        pytest.param(("128Mi", "lots"), "is not a size", id="bad-size"),
        pytest.param(("shoal/v1", "shoal/v2"), "apiVersion", id="wrong-api-version"),
        pytest.param(("name: default", "name: Default_Pool"), "metadata.name", id="bad-name"),
        pytest.param(("{min: 0, max: 4}", "[0, 4]"), "spec.replicas", id="wrong-type"),
    ],
)
def test_a_bad_manifest_is_refused_with_file_field_and_reason(
    edit: tuple[str, str], expected: str
) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_pools(GOOD.replace(*edit), source="manifests/pool.yaml")
    assert caught.value.source == "manifests/pool.yaml"
    assert any(expected in problem for problem in caught.value.problems), caught.value.problems
    assert str(caught.value).startswith("manifests/pool.yaml: ")


def test_invalid_yaml_is_refused() -> None:
    with pytest.raises(PolicyError, match="not valid YAML"):
        parse_pools("spec: [unclosed", source="x.yaml")


def test_a_pool_declared_twice_is_refused() -> None:
    with pytest.raises(PolicyError, match="declared more than once"):
        parse_pools(GOOD + "---" + GOOD, source="x.yaml")


@pytest.mark.parametrize(
    "text", ["", "# only a comment\n", "---\n"], ids=["empty", "comment", "dashes"]
)
def test_a_file_that_declares_no_pool_is_refused(tmp_path: Path, text: str) -> None:
    """An editor that truncates before writing must not tear the pools down."""
    (tmp_path / "pool.yaml").write_text(text)
    with pytest.raises(PolicyError, match="declares no WorkerPool"):
        load_pools(tmp_path)


def test_examples_folder_is_not_loaded(tmp_path: Path) -> None:
    (tmp_path / "pool.yaml").write_text(GOOD)
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "other.yaml").write_text("not: [valid")
    assert [p.name for p in load_pools(tmp_path)] == ["default"]


def test_template_hash_is_stable_and_changes_with_the_template() -> None:
    [a] = parse_pools(GOOD, source="a")
    [b] = parse_pools(GOOD, source="b")
    [c] = parse_pools(GOOD.replace('"3"', '"4"'), source="c")
    assert a.spec.template.template_hash() == b.spec.template.template_hash()
    assert a.spec.template.template_hash() != c.spec.template.template_hash()


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("2s", 2.0), ("5m", 300.0), ("1h", 3600.0), (30, 30.0), ("1.5s", 1.5)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration_s(text) == seconds


@pytest.mark.parametrize(("text", "size"), [("1Ki", 1024), ("128Mi", 134217728), ("1G", 10**9)])
def test_sizes(text: str, size: int) -> None:
    assert parse_size_bytes(text) == size


def test_a_file_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    (tmp_path / "pool.yaml").write_bytes(GOOD.encode() + b"\n# \xff\xfe\n")
    with pytest.raises(PolicyError, match="not UTF-8"):
        load_pools(tmp_path)
