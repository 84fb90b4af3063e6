"""What a stage request means (relaunchd.engine.stage_request): the one way a request and
the configuration become staging options — for the daemon's Stage and for
`relaunchctl stage --local` alike — refusing bad requests before any work."""

from __future__ import annotations

import uuid

import pytest

from relaunchd.engine import stage_request
from relaunchd.engine.config import CmdlineConfig, Config, LaunchConfig, TrustConfig, TxtConfig
from relaunchd.engine.stage_request import StageRequest, stage_options
from relaunchd.errors import InvalidArgument, NotReady

ROOT = "/"          # SysRoot needs a directory that exists; nothing is read here


def configured(root: str = ROOT, **kw) -> Config:
    return Config(root=root, image_dirs=("/boot", "/efi"),
                  trust=TrustConfig(certificates=("/etc/relaunchd/db.pem",)),
                  txt=TxtConfig(sinit_acm_dirs=("/opt/acm",), dl_handler="/opt/dl.bin",
                                sinit_acm="/opt/acm/x.bin"),
                  cmdline=CmdlineConfig(append=("quiet",), id_argument=False), **kw)


CONFIG = configured()


def options(request: StageRequest, config: Config = CONFIG, best: str | None = "kexec",
            trusted=None):
    return stage_options(config, request, best_method=best, trusted=trusted)


def test_the_options_carry_the_configuration(tmp_path):
    config = configured(str(tmp_path))
    got = options(StageRequest("/boot/a.efi", append=("debug",), cmdline="x=1", profile=2),
                  config)
    assert got.method == "kexec" and got.profile == 2 and got.custom_cmdline == "x=1"
    assert got.append == ["quiet", "debug"]              # configured first, then asked
    assert got.add_id_argument is False
    assert got.policy.allowed_dirs == ("/boot", "/efi") and not got.policy.follow_symlinks
    assert got.root.root == str(tmp_path)
    # where the launch method looks: the same probe configuration Capabilities use
    assert got.probe_config == config.probe_config()
    assert got.probe_config.root == str(tmp_path)
    assert got.probe_config.acm_dirs == ("/opt/acm",)
    assert got.probe_config.dl_handler == "/opt/dl.bin"
    assert got.sinit_acm == "/opt/acm/x.bin"
    assert got.banks == CONFIG.measurement.banks


def test_trust_is_loaded_by_staging_unless_given():
    assert options(StageRequest("/boot/a.efi")).certificate_files == ["/etc/relaunchd/db.pem"]
    given = options(StageRequest("/boot/a.efi"), trusted=["cert"])
    assert given.trusted == ["cert"] and given.certificate_files == []


def test_every_stage_gets_its_own_relaunch_id():
    ids = {options(StageRequest("/boot/a.efi")).relaunch_id for _ in range(5)}
    assert len(ids) == 5 and all(uuid.UUID(i).version == 4 for i in ids)


@pytest.mark.parametrize(("method", "best", "loader", "expected"), [
    (None, "txt", None, ("txt", "segments")),           # auto: the best ready method
    (None, None, None, ("kexec", "file")),              # nothing ready: try a kexec
    ("skinit", "kexec", None, ("skinit", "segments")),
    ("kexec", "txt", "segments", ("kexec", "segments")),
])
def test_method_and_loader(method, best, loader, expected):
    got = options(StageRequest("/boot/a.efi", method=method, loader=loader), best=best)
    assert (got.method, got.effective_loader) == expected


@pytest.mark.parametrize(("request_", "error", "fragment"), [
    (StageRequest("boot/a.efi"), InvalidArgument, "absolute"),
    (StageRequest("/boot/a.efi", profile=-1), InvalidArgument, "profile"),
    (StageRequest("/boot/a.efi", profile=True), InvalidArgument, "profile"),
    (StageRequest("/boot/a.efi", append="quiet"), InvalidArgument, "list of kernel arguments"),
    (StageRequest("/boot/a.efi", method="grub"), InvalidArgument, "unknown launch method"),
    (StageRequest("/boot/a.efi", loader="magic"), InvalidArgument, "unknown loader"),
])
def test_bad_requests_are_refused(request_, error, fragment):
    with pytest.raises(error, match=fragment):
        options(request_)


def test_require_drtm_refuses_what_is_not_a_dynamic_launch():
    strict = Config(launch=LaunchConfig(require_drtm=True))
    with pytest.raises(NotReady, match="require_drtm"):
        options(StageRequest("/boot/a.efi"), strict, best=None)
    with pytest.raises(NotReady, match="require_drtm"):
        options(StageRequest("/boot/a.efi", method="kexec"), strict)
    assert options(StageRequest("/boot/a.efi"), strict, best="txt").method == "txt"


def test_relaunchctl_stage_local_goes_through_it(tmp_path, monkeypatch, capsys):
    """`relaunchctl stage --local` builds its options here, from its flags."""
    from relaunchd.cli import main

    seen = []

    def spy(config, request, **kw):
        seen.append((config, request, kw))
        raise NotReady("stopped by the test before any staging")

    monkeypatch.setattr(stage_request, "stage_options", spy)
    image = tmp_path / "x.efi"
    image.write_bytes(b"MZ")
    code = main(["stage", "--local", "--dry-run", "--image-dir", str(tmp_path), "--cert",
                 "/etc/db.pem", "--append", "debug", str(image)])
    assert code != 0 and "stopped by the test" in capsys.readouterr().err
    [(config, request, kw)] = seen
    assert config.image_dirs == (str(tmp_path),) and config.trust.certificates == ("/etc/db.pem",)
    assert request.path == str(image) and request.append == ("debug",)
    assert kw == {"best_method": None, "trusted": None}
