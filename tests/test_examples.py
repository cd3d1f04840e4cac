"""The example configs in examples/ stay valid, and the Pixiu seed stays as written inside the complete one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_seed_with_cluster_is_the_seed_unchanged_plus_clusters() -> None:
    seed = (EXAMPLES / "pixiu-seed-config.yaml").read_text(encoding="utf-8")
    full = (EXAMPLES / "pixiu-seed-with-cluster.yaml").read_text(encoding="utf-8")
    assert "dgp.filter.ai.kvcache" in seed and "clusters:" not in seed
    assert full.startswith(seed) and "\nclusters:\n" in full[len(seed) :]


def check_config(name: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "kvgate.cli", "check-config", str(EXAMPLES / name)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_check_config_accepts_the_complete_example() -> None:
    r = check_config("pixiu-seed-with-cluster.yaml")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("ok: 1 listener(s), 1 cluster(s), 2 endpoint(s)")


def test_check_config_names_the_missing_cluster_of_the_bare_seed() -> None:
    r = check_config("pixiu-seed-config.yaml")
    assert r.returncode == 2
    assert "route.cluster: unknown cluster 'vllm_cluster'" in r.stderr


def test_check_config_accepts_the_cache_management_example_without_unknown_keys(tmp_path: Path) -> None:
    r = check_config("kvgate-managed.yaml")
    assert r.returncode == 0, r.stderr
    assert "unknown" not in r.stderr.lower()
    bad = tmp_path / "bad.yaml"
    bad.write_text((EXAMPLES / "kvgate-managed.yaml").read_text().replace("signals: engine", "signals: gpu"))
    r = subprocess.run([sys.executable, "-m", "kvgate.cli", "check-config", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2 and "cache_strategy.signals" in r.stderr
