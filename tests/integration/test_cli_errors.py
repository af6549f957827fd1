"""Bad disks, bad configs and a disk already in use: one clear line on stderr, a nonzero
exit, no traceback, and nothing written to a disk that another process is using."""

from __future__ import annotations

import os

import pytest

from support.helpers import PY, ROOT, free_port, run

SB_BYTES = 8192  # both superblock copies


def one_line_error(argv, *fragments, timeout=60):
    res = run(argv, timeout=timeout, check=False, cwd=ROOT)
    err = (res.stderr + res.stdout).strip()
    assert res.returncode != 0, f"{argv[3:]} succeeded: {err}"
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, f"not one line:\n{err}"
    for f in fragments:
        assert f in err, (f, err)
    return err


def write_config(tmp_path, disk: str, meta_disk: str = "internal", nbd_a: str | None = None,
                 nbd_b: str | None = None) -> str:
    pa, pb = free_port(), free_port()
    text = f"""[resource]
name = "r0"
shared-secret = "s"
run-dir = "{tmp_path / 'run'}"

[node.alpha]
address = "127.0.0.1:{pa}"
disk = "{disk}"
nbd = "{nbd_a or f'127.0.0.1:{free_port()}'}"
meta-disk = "{meta_disk}"

[node.beta]
address = "127.0.0.1:{pb}"
disk = "{tmp_path / 'beta.img'}"
nbd = "{nbd_b or f'127.0.0.1:{free_port()}'}"
"""
    path = tmp_path / "r0.toml"
    path.write_text(text)
    return str(path)


def cmd(config: str, *args: str) -> list[str]:
    return [PY, "-m", "blockrep", args[0], config, "--node", "alpha", *args[1:]]


@pytest.mark.parametrize("kind", ["directory", "missing"])
def test_bad_disk_path_is_one_line(tmp_path, kind):
    disk = tmp_path / "d"
    if kind == "directory":
        disk.mkdir()
    cfg = write_config(tmp_path, str(disk))
    what = "is a directory" if kind == "directory" else "does not exist"
    for args in (("create-md",), ("create-md", "--force"), ("dump-md",), ("up",),
                 ("up", "--no-metadata")):
        one_line_error(cmd(cfg, *args), f"disk {disk} {what}")
    one_line_error([PY, "-m", "blockrep", "serve", "--disk", str(disk), "--listen",
                    f"127.0.0.1:{free_port()}"], f"disk {disk} {what}")


def test_bad_meta_disk_is_one_line(tmp_path):
    disk = tmp_path / "alpha.img"
    with open(disk, "wb") as f:
        f.truncate(16 << 20)
    (tmp_path / "md").mkdir()
    cfg = write_config(tmp_path, str(disk), meta_disk=str(tmp_path / "md"))
    for args in (("create-md",), ("up",)):
        one_line_error(cmd(cfg, *args), f"metadata file {tmp_path / 'md'} is a directory")


@pytest.mark.parametrize("clash", ["own-replication-port", "same-nbd"])
def test_port_clash_refused_when_the_config_is_read(tmp_path, clash):
    disk = tmp_path / "alpha.img"
    with open(disk, "wb") as f:
        f.truncate(16 << 20)
    nbd = f"127.0.0.1:{free_port()}"
    cfg = write_config(tmp_path, str(disk), nbd_a=nbd, nbd_b=nbd)
    if clash == "own-replication-port":
        text = open(cfg).read()
        addr = text.split('address = "')[1].split('"')[0]
        text = text.replace(f'nbd = "{nbd}"', f'nbd = "{addr}"', 1)
        text = text.replace(f'nbd = "{nbd}"', f'nbd = "127.0.0.1:{free_port()}"')
        open(cfg, "w").write(text)
    for args in (("create-md",), ("up", "--no-metadata")):
        err = one_line_error(cmd(cfg, *args), "use another port")
        assert "Errno" not in err
    assert open(disk, "rb").read(1 << 20) == bytes(1 << 20)  # nothing was written


def test_second_up_refused_and_running_superblock_unchanged(cluster):
    from blockrep.meta import layout

    c = cluster(size="64M")
    first = c.start("alpha")
    disk = c.disk("alpha")
    _, md_offset, _ = layout(os.path.getsize(disk), internal=True)

    def superblocks() -> bytes:
        with open(disk, "rb") as f:
            f.seek(md_offset)
            return f.read(SB_BYTES)

    before = superblocks()
    in_use = f"disk {disk} is in use by another blockrep process"
    for args in (("up",), ("up", "--no-metadata"), ("create-md", "--force"), ("dump-md",)):
        one_line_error([PY, "-m", "blockrep", args[0], c.configs["alpha"], "--node", "alpha",
                        *args[1:]], in_use)
    one_line_error([PY, "-m", "blockrep", "serve", "--disk", disk, "--listen",
                    f"127.0.0.1:{free_port()}"], in_use)
    # the same disk in another resource's config is refused just the same
    other = open(c.configs["beta"]).read().replace(c.disk("beta"), disk)
    other_cfg = os.path.join(c.dir, "other.toml")
    with open(other_cfg, "w") as f:
        f.write(other.replace('name = "r0"', 'name = "r1"'))
    one_line_error([PY, "-m", "blockrep", "up", other_cfg, "--node", "beta", "--no-metadata"],
                   in_use)
    assert superblocks() == before, "the running node's superblock was rewritten"
    assert first.poll() is None, c.log("alpha")
    assert c.status("alpha")["role"] == "Secondary"
    c.stop("alpha")
    c.cli("alpha", "dump-md")  # free again once the node is down
