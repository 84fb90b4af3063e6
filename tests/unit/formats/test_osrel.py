"""os-release text as systemd parses it (relaunchd.formats.osrel)."""

from __future__ import annotations

from relaunchd.formats.osrel import parse_env_block


def test_os_release_quoting_and_comments():
    text = ('# comment\nNAME="Debian GNU/Linux"\nID=debian\nVERSION=\'12 (bookworm)\'\n'
            'BAD LINE\n1X=no\nESC="a\\"b"\n\n')
    assert parse_env_block(text) == {"NAME": "Debian GNU/Linux", "ID": "debian",
                                     "VERSION": "12 (bookworm)", "ESC": 'a"b'}
