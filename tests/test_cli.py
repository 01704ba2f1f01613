# SPDX-License-Identifier: Apache-2.0
"""`ms-llm --help` lists every command with one line; an unknown command exits 2."""
from ms_llm.cli import COMMANDS, main


def test_help_lists_every_command_with_a_line(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out.splitlines()
    listed = {line.split()[0]: line for line in out if line.startswith("  ")}
    assert set(listed) == set(COMMANDS) and len(COMMANDS) >= 12
    assert all(len(line.split()) > 3 for line in listed.values())              # a description, not just a name
    assert main([]) == 0 and "train" in capsys.readouterr().out


def test_unknown_command_exits_2(capsys):
    assert main(["trian"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'trian'" in err and "commands:" in err
