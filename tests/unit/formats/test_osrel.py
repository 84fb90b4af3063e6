from relaunchd.formats.osrel import parse_env_block
from relaunchd.formats.uki import mangle_cmdline


def test_os_release_quoting_and_comments():
    text = ('# comment\nNAME="Debian GNU/Linux"\nID=debian\nVERSION=\'12 (bookworm)\'\n'
            'BAD LINE\n1X=no\nESC="a\\"b"\n\n')
    assert parse_env_block(text) == {"NAME": "Debian GNU/Linux", "ID": "debian",
                                     "VERSION": "12 (bookworm)", "ESC": 'a"b'}


def test_cmdline_mangling_as_the_stub_does():
    assert mangle_cmdline("  quiet\n\tsplash \x7f x\n\n") == "quiet  splash   x"
    assert mangle_cmdline("") == ""
    assert mangle_cmdline("a\x00b") == "a b"
