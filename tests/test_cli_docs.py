"""Bash completion and the man page are generated from the argparse definitions
(tools/gen-cli-docs): the shipped files in contrib/ are what the parser gives now, they
name every subcommand, the completion completes in a real bash and the page renders
without groff warnings."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from support.helpers import ROOT, require_tool

from blockrep.cli import build_parser

GEN = os.path.join(ROOT, "tools", "gen-cli-docs")
COMPLETION = os.path.join(ROOT, "contrib", "bash-completion", "blockrep")
MANPAGE = os.path.join(ROOT, "contrib", "man", "blockrep.1")


def subcommands() -> dict[str, argparse.ArgumentParser]:
    p = build_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def test_shipped_files_are_what_the_parser_gives(tmp_path):
    res = subprocess.run([sys.executable, GEN, "--check"], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert res.returncode == 0, res.stderr
    res = subprocess.run([sys.executable, GEN, "--out", str(tmp_path)], capture_output=True,
                         text=True, cwd=ROOT, timeout=60)
    assert res.returncode == 0, res.stderr
    assert read(tmp_path / "contrib" / "bash-completion" / "blockrep") == read(COMPLETION)
    # --check notices a stale file
    stale = tmp_path / "contrib" / "bash-completion" / "blockrep"
    stale.write_text(read(COMPLETION).replace("wait-sync", "wait-synced"))
    res = subprocess.run([sys.executable, GEN, "--check", "--out", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert res.returncode == 1 and "out of date" in res.stderr


def test_every_subcommand_and_option_is_in_both():
    comp, man = read(COMPLETION), read(MANPAGE)
    cmds = subcommands()
    assert {"serve", "up", "status", "wait-sync", "create-md", "demo"} <= set(cmds)
    for name, sub in cmds.items():
        assert f"COMMAND \\fI\\,'blockrep {name}'" in man.replace("\\-", "-"), name
        assert f"_shtab_blockrep_{name.replace('-', '_')}_option_strings" in comp, name
        for action in sub._actions:
            for opt in action.option_strings:
                if opt in ("-h", "--help"):  # argparse's own, left out of the page
                    continue
                assert opt.replace("-", "\\-") in man, (name, opt)
                assert opt in comp, (name, opt)
    assert ".SH EXIT STATUS" in man and ".B 141" in man


def complete(words: list[str]) -> list[str]:
    """COMPREPLY of the shipped completion for the command line `words` (last one partial)."""
    script = (f"source {COMPLETION}; COMP_WORDS=({' '.join(words)} ''); "
              f"COMP_CWORD={len(words)}; _shtab_blockrep; printf '%s\\n' \"${{COMPREPLY[@]}}\"")
    if words[-1] != "":
        script = (f"source {COMPLETION}; COMP_WORDS=({' '.join(words)}); "
                  f"COMP_CWORD={len(words) - 1}; _shtab_blockrep; "
                  f"printf '%s\\n' \"${{COMPREPLY[@]}}\"")
    res = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    return res.stdout.split()


def test_completion_completes_in_bash(tmp_path):
    require_tool("bash")
    assert complete(["blockrep", "wait-"]) == ["wait-connect", "wait-sync"]
    assert "--drbd" in complete(["blockrep", "status", "--d"])
    assert set(complete(["blockrep", "serve", "--tls"])) >= {"--tls", "--tls-cert", "--tls-ca"}
    cfg = tmp_path / "r0.toml"
    cfg.write_text("")
    assert complete(["blockrep", "status", str(tmp_path / "r0")]) == [str(cfg)]


def test_man_page_renders_without_warnings():
    require_tool("groff")
    res = subprocess.run(["groff", "-man", "-ww", "-z", MANPAGE], capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    res = subprocess.run(["groff", "-man", "-Tutf8", MANPAGE], capture_output=True,
                         text=True, timeout=30)
    assert "blockrep - block-level replication" in res.stdout.replace("\u2010", "-")
