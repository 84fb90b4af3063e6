"""crypttab(5) lines as systemd 252 reads them: fields, options, device specs resolved
unquoted, case kept and udev-escaped; bad lines and devices are InvalidVolume, never a
traceback."""

from __future__ import annotations

import pytest

from relaunchd.errors import InvalidVolume
from relaunchd.formats import crypttab


def test_crypttab_fields_options_and_device_specs():
    entries = crypttab.parse(
        "# comment\n\n"
        "data  UUID=ABCD-1234  none  luks,tpm2-device=auto,x-initrd.attach\n"
        "swap /dev/sdb2 /dev/urandom swap,cipher=aes-xts-plain64\n"
        "home PARTLABEL=home\n"
        "\tlogs LABEL=logs - tpm2-pcrs=7+8,tpm2-pcrs=7\n")
    assert [e.name for e in entries] == ["data", "swap", "home", "logs"]
    data, swap, home, logs = entries
    assert data.device_node == "/dev/disk/by-uuid/ABCD-1234" and data.key_file is None
    assert data.in_initrd and data.option("tpm2-device") == "auto" and data.option("luks")
    assert swap.key_file == "/dev/urandom" and swap.device_node == "/dev/sdb2"
    assert home.options == () and home.device_node == "/dev/disk/by-partlabel/home"
    assert logs.key_file is None and logs.option("tpm2-pcrs") == "7"   # the last one wins
    assert logs.line == 6 and not logs.in_initrd
    assert crypttab.device_node('LABEL="my disk/1"') == "/dev/disk/by-label/my\\x20disk\\x2f1"


@pytest.mark.parametrize("text, match", [
    ("justone\n", "1 fields"),
    ("a b c d e\n", "5 fields"),
    ("../x /dev/sda\n", "bad volume name"),
])
def test_crypttab_bad_lines(text, match):
    with pytest.raises(InvalidVolume, match=match):
        crypttab.parse(text)


@pytest.mark.parametrize("spec", ["UUID=", "UUID=\"\"", "relative/path", "LABEL=.."])
def test_crypttab_bad_devices(spec):
    with pytest.raises(InvalidVolume):
        crypttab.device_node(spec)
