"""Where the readiness probe looks (relaunchd.platform.probe_config): defaults that the
documented configuration repeats, a root prefix every probe path is read under, and a
module that imports nothing (so the configuration can name its defaults cheaply)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fixtures.platforms.build import materialize
from relaunchd.platform import readiness
from relaunchd.platform.probe_config import ProbeConfig

CONF = Path(__file__).resolve().parents[3] / "conf" / "relaunchd.yaml"


def test_defaults_are_absolute_platform_paths():
    config = ProbeConfig()
    assert config.root == "/" and config.tpm_tcti is None
    for path in (*config.acm_dirs, config.dl_handler, config.skl):
        assert path.startswith("/"), path
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.root = "/x"   # type: ignore[misc]


def test_the_documented_configuration_repeats_the_defaults():
    txt = yaml.safe_load(CONF.read_text())["txt"]
    assert tuple(txt["sinit_acm_dirs"]) == ProbeConfig.acm_dirs
    assert txt["dl_handler"] == ProbeConfig.dl_handler


def test_every_path_is_read_under_the_root(tmp_path):
    """The configured places, moved: the probe finds the handler, SKL and ACMs there."""
    root = materialize("intel-txt-server", tmp_path)
    (root / "opt/acm").mkdir(parents=True)
    (root / "boot/SPR_SINIT_v1.2.BIN").rename(root / "opt/acm/SPR_SINIT_v1.2.BIN")
    (root / "usr/lib/relaunchd/txt-dl-handler.bin").rename(root / "opt/handler.bin")
    config = ProbeConfig(root=str(root), acm_dirs=("/opt/acm",), dl_handler="/opt/handler.bin",
                         skl="/opt/skl.bin")
    facts = readiness.read_facts(config).facts
    assert facts["launch.dl_handler"].value["valid"] is True
    assert facts["launch.dl_handler"].path == "/opt/handler.bin"
    assert facts["txt.acm_match"].value == "/opt/acm/SPR_SINIT_v1.2.BIN"
    default = readiness.read_facts(ProbeConfig(root=str(root))).facts
    assert default["launch.dl_handler"].value == {"present": False}
    assert default["txt.acm_match"].value is None


def test_importing_it_imports_nothing_of_relaunchd():
    code = ("import sys; import relaunchd.platform.probe_config; "
            "print(sorted(m for m in sys.modules if m.startswith('relaunchd.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "['relaunchd.platform', 'relaunchd.platform.probe_config']"
