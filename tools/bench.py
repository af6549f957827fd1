"""tools/bench: fio (nbd engine) workloads against blockrep and reference NBD servers.

Runs every workload against every target on the same backing file, one at a time, and prints
a table: IOPS, MB/s, p50/p99 completion latency, and blockrep/nbdkit per workload.
Everything it prints was measured in this run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from blockrep.loopback import LoopbackPair, PairError, stop_process

import bench_distance  # noqa: E402 - tools/bench_distance.py, beside this file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
BUSY_POLL_US = 100  # the -poll targets' busy-poll window (microseconds)

WORKLOADS = {
    "4k-randwrite-qd1": dict(rw="randwrite", bs="4k", iodepth=1),
    "4k-randwrite-qd32": dict(rw="randwrite", bs="4k", iodepth=32),
    "4k-randread-qd32": dict(rw="randread", bs="4k", iodepth=32),
    "1m-seqwrite-qd8": dict(rw="write", bs="1m", iodepth=8),
    "1m-seqread-qd8": dict(rw="read", bs="1m", iodepth=8),
}
DEFAULT_WORKLOADS = ",".join(WORKLOADS)
# multi-conn scale figures (not run unless named): N NBD connections, one fio job each, at
# QD32 per connection; IOPS are the sum over the connections
for _n in (4, 8):
    WORKLOADS[f"4k-randwrite-qd32-{_n}conn"] = dict(rw="randwrite", bs="4k", iodepth=32,
                                                   numjobs=_n)
    WORKLOADS[f"4k-randread-qd32-{_n}conn"] = dict(rw="randread", bs="4k", iodepth=32,
                                                  numjobs=_n)


def checkout_of(py: str) -> str:
    """The blockrep checkout a Python runs: this one, or the one whose .venv it is."""
    if os.path.abspath(py) == os.path.abspath(PY):
        return ROOT
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(py))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} did not open")


_TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (/proc/PID/stat fields 14-15),
    0.0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def nbd_tls_certs(tmp: str, tag: str) -> tuple[str, str]:
    """An X.509 server certificate for 127.0.0.1 made with trustme -> (cert, key) files."""
    import trustme  # a test dependency (pyproject.toml [test])

    leaf = trustme.CA().issue_cert("127.0.0.1", "localhost")
    cert, key = (os.path.join(tmp, f"{tag}-nbd-server.{x}") for x in ("crt", "key"))
    leaf.cert_chain_pems[0].write_to_path(cert)
    leaf.private_key_pem.write_to_path(key)
    return cert, key


@dataclass
class Target:
    name: str
    argv: list
    port: int
    proc: subprocess.Popen | None = None
    py: str = PY  # the Python (and so the blockrep checkout) that runs blockrep targets
    nbd_tls: bool = False  # served over NBD STARTTLS with TLS required: fio uses nbds://

    def cpu_pids(self) -> dict[str, int]:
        """The processes whose CPU time is this target's cost, by role."""
        return {"server": self.proc.pid} if self.proc else {}

    def start(self, log_dir: str) -> None:
        path = os.path.join(log_dir, f"{self.name}.log")
        log = open(path, "w")
        # cwd: `python -m blockrep` imports the blockrep of its working directory first, so
        # a NAME@base target must run in the baseline checkout, not in this one
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=checkout_of(self.py))
        try:
            wait_port(self.port, self.proc)
        except RuntimeError as exc:
            with open(path) as f:
                raise RuntimeError(f"{self.name}: {exc}: {f.read()[-1500:]}") from None

    def stop(self) -> None:
        if self.proc:
            stop_process(self.proc)

    @property
    def uri(self) -> str:
        if self.nbd_tls:
            # fio's nbd engine does not let libnbd read local files named in the URI
            # (tls-certificates=DIR), so it does not verify the bench's throwaway server
            # certificate: the handshake is one-time, the per-request cost is the same
            return f"nbds://127.0.0.1:{self.port}/?tls-verify-peer=false"
        return f"nbd://127.0.0.1:{self.port}/"


class ReplicatedTarget(Target):
    """A blockrep primary with a connected secondary: blockrep.loopback's pair (the one the
    demo and the tests use), run by `py` (this checkout's Python, or a baseline's); with
    tls=True the link runs over mutual TLS (certificates made here with trustme); with
    nbd_tls=True the Primary's NBD export has nbd-tls = "require"."""

    def __init__(self, name: str, disk: str, tmp: str, py: str = PY, tls: bool = False,
                 busy_poll: float = 0, nbd_tls: bool = False):
        self.tmp = tmp
        self.disk = disk
        tag = name.replace("@", "-")
        self.secondary = os.path.join(tmp, f"{tag}-secondary.img")
        self.pair = LoopbackPair(os.path.join(tmp, f"pair-{tag}"), name="bench",
                                 secret="bench", python=py, root=checkout_of(py),
                                 disks={"alpha": disk, "beta": self.secondary})
        super().__init__(name, [], self.pair.nbd_port("alpha"), py=py)
        self.cfg = self.pair.configs["alpha"]
        self.nodes = self.pair.procs
        if tls:
            self._add_tls(tag)
        if busy_poll:
            self.add_resource(f"busy-poll = {busy_poll}")
        if nbd_tls:
            self.nbd_tls = True
            cert, key = nbd_tls_certs(tmp, tag)

            def edit(text: str) -> str:
                text = text.replace("[resource]\n", '[resource]\nnbd-tls = "require"\n')
                for n in ("alpha", "beta"):
                    text = text.replace(f"[node.{n}]\n", f'[node.{n}]\nnbd-tls-cert = '
                                                         f'"{cert}"\nnbd-tls-key = "{key}"\n')
                return text
            self._edit_configs(edit)

    def add_resource(self, *lines: str) -> None:
        """Lines for both nodes' [resource] (e.g. 'resync-window = 128')."""
        extra = "".join(f"{line}\n" for line in lines)
        self._edit_configs(lambda text: text.replace("[resource]\n", f"[resource]\n{extra}"))

    def _edit_configs(self, edit) -> None:
        for path in set(self.pair.configs.values()):
            with open(path) as f:
                text = f.read()
            with open(path, "w") as f:
                f.write(edit(text))

    def _add_tls(self, tag: str) -> None:
        import trustme  # a test dependency (pyproject.toml [test])

        ca = trustme.CA()
        ca_path = os.path.join(self.tmp, f"{tag}-ca.crt")
        ca.cert_pem.write_to_path(ca_path)
        files = {}
        for n in ("alpha", "beta"):
            leaf = ca.issue_cert(n)
            files[n] = tuple(os.path.join(self.tmp, f"{tag}-{n}.{x}") for x in ("crt", "key"))
            leaf.cert_chain_pems[0].write_to_path(files[n][0])
            leaf.private_key_pem.write_to_path(files[n][1])

        def edit(text: str) -> str:
            text = text.replace("[resource]\n",
                                f'[resource]\ntls = true\ntls-ca = "{ca_path}"\n')
            for n, (cert, key) in files.items():
                text = text.replace(f"[node.{n}]\n",
                                    f'[node.{n}]\ntls-cert = "{cert}"\ntls-key = "{key}"\n')
            return text
        self._edit_configs(edit)

    def cpu_pids(self) -> dict[str, int]:
        return {"primary": self.nodes["alpha"].pid, "secondary": self.nodes["beta"].pid} \
            if self.nodes else {}

    def cli(self, node, *args):
        res = self.pair.cli(node, *args, timeout=120)
        if res.returncode != 0:
            raise subprocess.CalledProcessError(res.returncode, args[0], res.stdout,
                                                res.stderr)
        return res.stdout

    def status(self, node):
        """Over the admin socket, in this process: a CLI process per poll would steal the
        CPU the measured resync needs."""
        try:
            return self.pair.admin(node)
        except (OSError, ValueError, PairError) as exc:  # node not up yet
            raise subprocess.CalledProcessError(1, "status", str(exc)) from None

    def start(self, log_dir: str) -> None:
        shutil.copyfile(self.disk, self.secondary)  # identical content: no initial sync
        self.pair.create_md()
        self.start_nodes(log_dir)
        self.cli("alpha", "primary", "--force", "--skip-initial-sync")
        try:
            self.pair.wait_status("alpha", lambda s: s["peer"]["disk"] == "UpToDate", 30,
                                  "the peer UpToDate", interval=0.1)
        except PairError as exc:
            raise RuntimeError(f"replicated pair did not become UpToDate: {exc}") from None
        self.proc = self.nodes["alpha"]

    def start_nodes(self, log_dir: str) -> None:
        """Start both nodes (`blockrep up`) and wait until they are connected."""
        for n in ("alpha", "beta"):
            self.pair.start(n, new_session=True, wait=False,
                            log=os.path.join(log_dir, f"{self.name}-{n}.log"))
        try:
            self.pair.wait_status("alpha", lambda s: s["connection"] == "Connected", 30,
                                  "connected", interval=0.1)
        except PairError as exc:
            raise RuntimeError(f"replicated pair did not connect: {exc}") from None

    def stop(self) -> None:
        self.pair.stop_all()


class QsdMirrorTarget(Target):
    """qemu-storage-daemon exporting the disk over NBD, with a blockdev-mirror job in
    copy-mode=write-blocking to a qemu-nbd target (TCP or Unix socket)."""

    def __init__(self, name: str, disk: str, tmp: str, transport: str):
        super().__init__(name, [], free_port())
        self.disk, self.tmp, self.transport = disk, tmp, transport
        self.target_img = os.path.join(tmp, f"{name}-target.img")
        self.procs = []

    def cpu_pids(self) -> dict[str, int]:
        return {"qsd": self.procs[1].pid, "qemu-nbd": self.procs[0].pid} \
            if len(self.procs) == 2 else {}

    def start(self, log_dir: str) -> None:
        shutil.copyfile(self.disk, self.target_img)
        log = open(os.path.join(log_dir, f"{self.name}.log"), "w")
        if self.transport == "unix":
            sock = os.path.join(self.tmp, f"{self.name}-tgt.sock")
            tgt_argv = ["qemu-nbd", "-f", "raw", "-x", "target", "-k", sock, "-t",
                        "--cache=writeback", self.target_img]
            server = f"server.type=unix,server.path={sock}"
        else:
            tport = free_port()
            tgt_argv = ["qemu-nbd", "-f", "raw", "-x", "target", "-b", "127.0.0.1", "-p",
                        str(tport), "-t", "--cache=writeback", self.target_img]
            server = f"server.type=inet,server.host=127.0.0.1,server.port={tport}"
        self.procs.append(subprocess.Popen(tgt_argv, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True))
        time.sleep(0.5)
        qmp = os.path.join(self.tmp, f"{self.name}-qmp.sock")
        argv = ["qemu-storage-daemon",
                "--blockdev", f"driver=file,filename={self.disk},node-name=src-file,"
                              "cache.direct=off,aio=threads",
                "--blockdev", "driver=raw,file=src-file,node-name=src",
                "--blockdev", f"driver=nbd,{server},export=target,node-name=tgt",
                "--nbd-server", f"addr.type=inet,addr.host=127.0.0.1,addr.port={self.port}",
                "--export", "type=nbd,id=exp0,node-name=src,name=,writable=on",
                "--chardev", f"socket,path={qmp},server=on,wait=off,id=qmp0",
                "--monitor", "chardev=qmp0"]
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.procs.append(self.proc)
        wait_port(self.port, self.proc)
        self._qmp(qmp, {"execute": "blockdev-mirror", "arguments": {
            "job-id": "m0", "device": "src", "target": "tgt", "sync": "full",
            "copy-mode": "write-blocking"}}, wait_ready=True)

    @staticmethod
    def _qmp(path, cmd, wait_ready=False):
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        f = s.makefile("rwb")
        f.readline()
        for c in ({"execute": "qmp_capabilities"}, cmd):
            f.write((json.dumps(c) + "\n").encode())
            f.flush()
            while True:
                msg = json.loads(f.readline())
                if "return" in msg:
                    break
                if "error" in msg:
                    raise RuntimeError(f"QMP: {msg['error']}")
        deadline = time.monotonic() + 300
        while wait_ready:
            f.write(b'{"execute": "query-block-jobs"}\n')
            f.flush()
            while True:
                msg = json.loads(f.readline())
                if "return" in msg:
                    break
            if msg["return"] and msg["return"][0].get("ready"):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("mirror job never became ready")
            time.sleep(0.2)
        s.close()

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def make_targets(disk: str, names: list[str], tmp: str = "/tmp",
                 baseline: str | None = None) -> list[Target]:
    """`NAME@base` runs blockrep target NAME from the checkout `baseline` (its .venv);
    `NAME-poll` is blockrep target NAME with busy polling (BUSY_POLL_US, shell/busypoll.py);
    `NAME-nbdtls` serves blockrep target NAME over NBD STARTTLS with TLS required (fio
    connects to an nbds:// URI)."""
    out = []
    for name in names:
        port = free_port()
        kind, _, at = name.partition("@")
        poll = kind.startswith("blockrep") and kind.endswith("-poll")
        kind = kind.removesuffix("-poll") if poll else kind
        nbd_tls = kind.startswith("blockrep") and kind.endswith("-nbdtls")
        kind = kind.removesuffix("-nbdtls") if nbd_tls else kind
        py = PY
        if at:
            if at != "base" or not baseline or not kind.startswith("blockrep"):
                raise SystemExit(f"unknown target {name} (NAME@base needs --baseline DIR)")
            py = os.path.join(os.path.abspath(baseline), ".venv", "bin", "python")
        if kind == "blockrep":
            argv = [py, "-m", "blockrep", "serve", "--disk", disk,
                    "--listen", f"127.0.0.1:{port}"] + (
                        ["--busy-poll", str(BUSY_POLL_US)] if poll else [])
            if nbd_tls:
                cert, key = nbd_tls_certs(tmp, name.replace("@", "-"))
                argv += ["--tls", "require", "--tls-cert", cert, "--tls-key", key]
        elif name == "nbdkit":
            argv = ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "file", disk]
        elif kind in ("blockrep-repl", "blockrep-repl-tls"):
            out.append(ReplicatedTarget(name, disk, tmp, py=py, tls=kind.endswith("-tls"),
                                        busy_poll=BUSY_POLL_US if poll else 0,
                                        nbd_tls=nbd_tls))
            continue
        elif name in ("qsd-mirror-unix", "qsd-mirror-tcp"):
            out.append(QsdMirrorTarget(name, disk, tmp, name.rsplit("-", 1)[1]))
            continue
        elif name == "qemu-nbd":
            argv = ["qemu-nbd", "-f", "raw", "-x", "", "-b", "127.0.0.1", "-p", str(port),
                    "-t", "-e", "8", "--cache=writeback", "--aio=threads", disk]
        else:
            raise SystemExit(f"unknown target {name}")
        out.append(Target(name, argv, port, py=py, nbd_tls=nbd_tls))
    return out


def run_fio(uri: str, wl: dict, runtime: int, size: int,
            cpu_pids: dict[str, int] | None = None, ramp: int = 1) -> dict:
    """One fio run. With `cpu_pids`, the servers' CPU time is sampled after the ramp and at
    the end: `cpu_cores` is CPU seconds per wall second per process, and per operation /
    per MiB it is that rate divided by fio's IOPS / MiB/s. The client's own CPU comes from
    fio's usr_cpu + sys_cpu."""
    argv = ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={wl['rw']}",
            f"--bs={wl['bs']}", f"--iodepth={wl['iodepth']}",
            f"--numjobs={wl.get('numjobs', 1)}", "--group_reporting",
            f"--size={size}", "--time_based", f"--runtime={runtime}", f"--ramp_time={ramp}",
            "--randrepeat=0", "--norandommap", "--output-format=json"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cpu0 = t0 = None
    if cpu_pids:
        time.sleep(ramp)
        t0 = time.monotonic()
        cpu0 = {k: proc_cpu(p) for k, p in cpu_pids.items()}
    try:
        out, err = proc.communicate(timeout=runtime + 120)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    if cpu_pids:
        wall = time.monotonic() - t0
        cores = {k: (proc_cpu(p) - cpu0[k]) / wall for k, p in cpu_pids.items()}
    if proc.returncode != 0:
        raise RuntimeError(f"fio failed: {err.strip()[-500:]}")
    job = json.loads(out[out.index("{"):])["jobs"][0]
    side = job["write"] if "write" in wl["rw"] else job["read"]
    pct = side["clat_ns"].get("percentile", {})
    r = {
        "iops": side["iops"],
        "mbs": side["bw_bytes"] / 1e6,
        "p50_us": pct.get("50.000000", 0) / 1000,
        "p99_us": pct.get("99.000000", 0) / 1000,
        "errors": job.get("error", 0),
        "client_cores": (job.get("usr_cpu", 0) + job.get("sys_cpu", 0)) / 100,
    }
    if cpu_pids:
        r["cpu_cores"] = cores
    return r


def cpu_costs(r: dict) -> dict:
    """Per process (and 'total' for the servers, 'client' for fio): CPU microseconds per
    operation and CPU milliseconds per MiB moved."""
    out = {}
    mib_s = r["mbs"] * 1e6 / (1 << 20)
    cores = dict(r.get("cpu_cores", {}))
    if cores:
        cores["total"] = sum(cores.values())
    cores["client"] = r["client_cores"]
    for k, c in cores.items():
        out[k] = (c / r["iops"] * 1e6 if r["iops"] else 0.0,
                  c / mib_s * 1e3 if mib_s else 0.0)
    return out


def prepare_disk(path: str, size: int) -> None:
    """A fully allocated file of random-ish data (so reads hit real data)."""
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            f.write(block)
    os.sync()


def print_table(results: dict, targets: list[str], workloads: list[str]) -> None:
    hdr = f"{'workload':<20} {'target':<20} {'IOPS':>9} {'MB/s':>8} {'p50 us':>8} " \
          f"{'p99 us':>8} {'vs nbdkit':>9} {'srv us/op':>9} {'srv ms/MiB':>10} " \
          f"{'fio us/op':>9}  per process us/op"
    print(hdr)
    print("-" * len(hdr))
    for wl in workloads:
        base = results.get(("nbdkit", wl))
        for t in targets:
            r = results.get((t, wl))
            if r is None:
                continue
            ratio = f"{r['iops'] / base['iops']:.2f}x" if base and base["iops"] else "-"
            c = cpu_costs(r)
            srv = c.get("total", (0.0, 0.0))
            per = " ".join(f"{k}={v[0]:.1f}" for k, v in c.items()
                           if k not in ("total", "client"))
            print(f"{wl:<20} {t:<20} {r['iops']:>9.0f} {r['mbs']:>8.1f} "
                  f"{r['p50_us']:>8.1f} {r['p99_us']:>8.1f} {ratio:>9} {srv[0]:>9.1f} "
                  f"{srv[1]:>10.2f} {c['client'][0]:>9.1f}  {per}")
    sys.stdout.flush()


def print_ratios(results: dict, names: list[str], wls: list[str]) -> None:
    """Replicated mode: blockrep-repl against standalone blockrep and the best qsd mirror."""
    if "blockrep-repl" not in names:
        return
    print()
    print(f"{'workload':<20} {'repl/standalone':>16} {'repl/best-qsd-mirror':>21}")
    for wl in wls:
        r = results.get(("blockrep-repl", wl))
        if r is None:
            continue
        sa = results.get(("blockrep", wl))
        qsd = [results[(t, wl)]["iops"] for t in names
               if t.startswith("qsd-mirror") and (t, wl) in results]
        a = f"{r['iops'] / sa['iops']:.2f}x" if sa and sa["iops"] else "-"
        b = f"{r['iops'] / max(qsd):.2f}x" if qsd and max(qsd) else "-"
        print(f"{wl:<20} {a:>16} {b:>21}")


def print_baseline(results: dict, names: list[str], wls: list[str]) -> None:
    """With --baseline: this checkout against the baseline checkout, target by target."""
    pairs = [(n, n + "@base") for n in names if n + "@base" in names]
    if not pairs:
        return
    print()
    print(f"{'workload':<20} {'target':<16} {'IOPS now/base':>14} {'CPU/op now/base':>16}")
    for wl in wls:
        for now, base in pairs:
            a, b = results.get((now, wl)), results.get((base, wl))
            if not a or not b or not b["iops"]:
                continue
            ca, cb = cpu_costs(a).get("total"), cpu_costs(b).get("total")
            cpu = f"{ca[0] / cb[0]:.2f}x" if ca and cb and cb[0] else "-"
            print(f"{wl:<20} {now:<16} {a['iops'] / b['iops']:>13.2f}x {cpu:>16}")


def run_io_bench(args) -> int:
    """All targets run at once on the same file; each workload runs on each target in turn,
    `--repeat` rounds, so slow drifts of this shared machine hit every target alike. The
    table shows the median round (by IOPS) per target and workload."""
    names = args.targets.split(",")
    wls = args.workloads.split(",")
    tmp = tempfile.mkdtemp(prefix="blockrep-bench-", dir=args.dir)
    disk = os.path.join(tmp, "disk.img")
    size = args.size_mib << 20
    fio_size = size - (8 << 20)  # leave room for blockrep's internal metadata
    print(f"# preparing {args.size_mib} MiB backing file in {tmp}", flush=True)
    prepare_disk(disk, size)
    samples: dict = {}
    started = []
    try:
        # every target gets its own copy of the same data: servers that lock their disk
        # (blockrep does) can run side by side, and none sees another's metadata
        targets = []
        for name in names:
            own = os.path.join(tmp, f"disk-{name.replace('@', '-')}.img")
            subprocess.run(["cp", "--reflink=auto", disk, own], check=True)
            targets += make_targets(own, [name], tmp, baseline=args.baseline)
        os.unlink(disk)
        os.sync()
        for target in targets:
            target.start(tmp)
            started.append(target)
        for wl in wls:
            for rnd in range(args.repeat):
                k = rnd % len(targets)  # each round starts with the next target: no target
                for target in targets[k:] + targets[:k]:  # always runs first or after X
                    os.sync()  # every run starts with no dirty data
                    r = run_fio(target.uri, WORKLOADS[wl], args.runtime, fio_size,
                                cpu_pids=target.cpu_pids())
                    samples.setdefault((target.name, wl), []).append(r)
                    cpu = " ".join(f"{k} {v:.2f}" for k, v in r["cpu_cores"].items())
                    print(f"# {target.name:<20} {wl:<18} round {rnd + 1}: {r['iops']:>9.0f} "
                          f"IOPS {r['mbs']:>8.1f} MB/s p50 {r['p50_us']:.0f}us "
                          f"p99 {r['p99_us']:.0f}us cores: {cpu} fio {r['client_cores']:.2f}",
                          flush=True)
    finally:
        for target in started:
            target.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    results = {k: sorted(v, key=lambda r: r["iops"])[len(v) // 2] for k, v in samples.items()}
    print()
    print(f"(median round of {args.repeat} by IOPS; CPU: user+sys of every thread from "
          f"/proc/PID/stat over the measured part of the run; srv = all server processes)")
    print_table(results, names, wls)
    print_ratios(results, names, wls)
    print_baseline(results, names, wls)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({f"{t}/{w}": v for (t, w), v in samples.items()}, f, indent=1)
    return 0


# -- resync ------------------------------------------------------------------------------------

DIRTY_WRITER = r"""
import nbd, sys
uri, listfile = sys.argv[1], sys.argv[2]
offs = [int(x) for x in open(listfile)]
h = nbd.NBD(); h.connect_uri(uri)
buf = nbd.Buffer.from_bytearray(bytearray(open('/dev/urandom','rb').read(4096)))
inflight = 0
for off in offs:
    while h.aio_in_flight() >= 64:
        h.poll(-1)
    h.aio_pwrite(buf, off)
while h.aio_in_flight() > 0:
    h.poll(-1)
h.flush(); h.shutdown()
"""


def _nbdcopy_time(src: str, tmp: str, size: int, dst_name: str, fresh: bool) -> float:
    """nbdcopy --flush between two `nbdkit file` servers; returns (seconds, CPU seconds of
    nbdcopy and both nbdkit). `fresh`: a new sparse destination (else the one from the
    previous round, allocated, like a resync target)."""
    dst = os.path.join(tmp, dst_name)
    if fresh and os.path.exists(dst):
        os.unlink(dst)
    if not os.path.exists(dst):
        with open(dst, "wb") as f:
            f.truncate(os.path.getsize(src))
    ports = [free_port(), free_port()]
    procs = [subprocess.Popen(["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(p), "file", f],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for p, f in zip(ports, (src, dst))]
    try:
        for p, proc in zip(ports, procs):
            wait_port(p, proc)
        os.sync()
        cpu0 = _children_cpu() + sum(proc_cpu(pr.pid) for pr in procs)
        t0 = time.monotonic()
        # --flush: durable at the end, as a resync is (its target acks only after a flush)
        subprocess.run(["nbdcopy", "--flush", f"nbd://127.0.0.1:{ports[0]}/",
                        f"nbd://127.0.0.1:{ports[1]}/"], check=True, timeout=600)
        t = time.monotonic() - t0
        cpu = _children_cpu() + sum(proc_cpu(pr.pid) for pr in procs) - cpu0
        if not _same(src, dst, size):
            raise RuntimeError("nbdcopy result differs from its source")
        return t, cpu
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait()


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)  # reaped children (nbdcopy)
    return ru.ru_utime + ru.ru_stime


def _pair_cpu(pair: ReplicatedTarget) -> float:
    return sum(proc_cpu(pid) for pid in pair.cpu_pids().values())


def _same(a: str, b: str, n: int) -> bool:
    return subprocess.run(["cmp", "-n", str(n), a, b], capture_output=True).returncode == 0


def _wait_sync_done(pair: ReplicatedTarget, node: str, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = pair.status(node)
        if s["replication"] == "Established" and s["last_sync"] and s["out_of_sync_bytes"] == 0:
            return s
        time.sleep(0.2)  # the node measures the resync itself; polling only ends the wait
    raise RuntimeError(f"resync did not finish: {s}")


def _median(xs):
    return sorted(xs)[len(xs) // 2]


def _wait_disconnected(pair: ReplicatedTarget) -> None:
    deadline = time.monotonic() + 30
    while pair.status("alpha")["connection"] == "Connected":
        if time.monotonic() > deadline:
            raise RuntimeError("beta did not disconnect")
        time.sleep(0.05)


def _app_writes(pair: ReplicatedTarget) -> int:
    c = pair.status("alpha")["counters"]
    return c["writes_replicated"] + c["writes_local_only"]


def _resync_beside_app(pair: ReplicatedTarget, uri: str, args) -> dict:
    """A full sync (`invalidate` on beta) while fio writes 4K QD32 on the Primary: the
    application's write rate just before and during the resync (the Primary's counters over
    each window) and the resync's own figures; the disks are compared after fio stops."""
    argv = ["fio", "--name=app", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
            "--bs=4k", "--iodepth=32", "--size=256m", "--time_based", "--runtime=600",
            "--randrepeat=0", "--norandommap", "--output-format=json"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(1.5)  # fio connected and running
        w0, t0 = _app_writes(pair), time.monotonic()
        time.sleep(args.runtime)
        w1, t1 = _app_writes(pair), time.monotonic()
        pair.cli("beta", "invalidate")
        s = _wait_sync_done(pair, "alpha")
        w2, t2 = _app_writes(pair), time.monotonic()
        if proc.poll() is not None:
            raise RuntimeError(f"fio ended early: {proc.stderr.read()[-300:]}")
    finally:
        proc.terminate()
        proc.wait()
    deadline = time.monotonic() + 30
    while pair.status("alpha")["counters"]["writes_pending_peer"]:  # the last ones land
        if time.monotonic() > deadline:
            raise RuntimeError("writes still pending on the peer 30 s after fio stopped")
        time.sleep(0.05)
    sync = s["last_sync"]
    return {"app_iops_alone": (w1 - w0) / (t1 - t0), "app_iops_during": (w2 - w1) / (t2 - t1),
            "bytes": sync["total_bytes"], "secs": sync["elapsed_s"]}


def _zero_pair(tmp: str, size: int, extra: list[str]) -> ReplicatedTarget:
    """A pair whose Primary holds `size` bytes of written (allocated) zeroes."""
    disk = os.path.join(tmp, "zeros.img")
    with open(disk, "wb") as f:
        for _ in range(size >> 20):
            f.write(bytes(1 << 20))
    pair = ReplicatedTarget("zeros", disk, tmp)
    pair.add_resource(*extra)
    with open(pair.secondary, "wb") as f:
        f.truncate(size)
    for n in ("alpha", "beta"):
        pair.cli(n, "create-md", "--force")
    return pair


def run_resync_bench(args) -> int:
    """Full sync of a random --size-mib disk (first by `primary --force`, then by
    `invalidate` on the target) and resync of 10% scattered dirty blocks, each round followed
    by nbdcopy of the same data between two `nbdkit file` servers; a full sync while fio
    writes on the Primary (the application's rate before and during it); a full sync of
    written zeroes (runs of zeroes: no payload on the link); medians of --repeat rounds."""
    import random
    tmp = tempfile.mkdtemp(prefix="blockrep-resync-", dir=args.dir)
    size = args.size_mib << 20
    rounds = {"full sync": [], "10% scattered": [], "zeros": [], "beside app": []}
    copies = {"full sync": [], "10% scattered": []}
    beside = []
    try:
        src = os.path.join(tmp, "src.img")
        print(f"# preparing {args.size_mib} MiB of random data in {tmp}", flush=True)
        with open(src, "wb") as f:
            for _ in range(size >> 20):
                f.write(os.urandom(1 << 20))
        alpha = os.path.join(tmp, "alpha.img")
        shutil.copyfile(src, alpha)
        pair = ReplicatedTarget("resync", alpha, tmp)
        pair.add_resource(*args.pair_config)
        with open(pair.secondary, "wb") as f:
            f.truncate(size)
        for n in ("alpha", "beta"):
            pair.cli(n, "create-md", "--force")
        sparse_src = os.path.join(tmp, "sparse-src.img")
        uri = f"nbd://127.0.0.1:{pair.port}/"
        try:
            pair.start_nodes(tmp)
            data_size = pair.status("alpha")["size_bytes"]
            nblocks = data_size // 4096
            for rnd in range(args.repeat):
                # full sync: alpha's data to a beta that has none
                os.sync()
                c0 = _pair_cpu(pair)
                if rnd == 0:
                    pair.cli("alpha", "primary", "--force")  # a new pair: full initial sync
                else:
                    pair.cli("beta", "invalidate")
                s = _wait_sync_done(pair, "alpha")
                full = s["last_sync"]
                full["cpu_s"] = round(_pair_cpu(pair) - c0, 3)
                if not _same(alpha, pair.secondary, data_size):
                    raise RuntimeError("full sync: disks differ afterwards")
                rounds["full sync"].append((full["total_bytes"], full["elapsed_s"],
                                            full["sent_bytes"], full["cpu_s"]))
                print(f"# round {rnd + 1} full sync: {full}", flush=True)
                copies["full sync"].append(
                    (data_size, *_nbdcopy_time(src, tmp, data_size, "copy-full.img",
                                               fresh=False)))
                print(f"# round {rnd + 1} nbdcopy full: {copies['full sync'][-1]}", flush=True)
                # sparse: 10% of the blocks, scattered, written while beta is disconnected
                rng = random.Random(42 + rnd)
                offs = sorted(rng.sample(range(nblocks), nblocks // 10))
                listfile = os.path.join(tmp, "dirty.txt")
                with open(listfile, "w") as f:
                    f.write("\n".join(str(b * 4096) for b in offs))
                pair.cli("beta", "disconnect")
                _wait_disconnected(pair)
                subprocess.run(["/usr/bin/python3", "-c", DIRTY_WRITER, uri, listfile],
                               check=True, timeout=600)
                dirty = pair.status("alpha")["out_of_sync_bytes"]
                os.sync()
                c0 = _pair_cpu(pair)
                pair.cli("beta", "connect")
                s = _wait_sync_done(pair, "alpha")
                sparse = s["last_sync"]
                sparse["cpu_s"] = round(_pair_cpu(pair) - c0, 3)
                if sparse["total_bytes"] != dirty:
                    raise RuntimeError(f"resynced {sparse['total_bytes']} of {dirty} dirty")
                if not _same(alpha, pair.secondary, data_size):
                    raise RuntimeError("sparse resync: disks differ afterwards")
                rounds["10% scattered"].append((sparse["total_bytes"], sparse["elapsed_s"],
                                                sparse["sent_bytes"], sparse["cpu_s"]))
                print(f"# round {rnd + 1} sparse resync: dirty {dirty} bytes, {sparse}",
                      flush=True)
                with open(alpha, "rb") as fi, open(sparse_src, "wb") as fo:
                    fo.truncate(os.path.getsize(src))
                    for b in offs:
                        fi.seek(b * 4096)
                        fo.seek(b * 4096)
                        fo.write(fi.read(4096))
                copies["10% scattered"].append(
                    (len(offs) * 4096, *_nbdcopy_time(sparse_src, tmp, data_size,
                                                      "copy-sparse.img", fresh=True)))
                print(f"# round {rnd + 1} nbdcopy sparse: {copies['10% scattered'][-1]}",
                      flush=True)
                # a full sync beside the application's writes
                b = _resync_beside_app(pair, uri, args)
                beside.append(b)
                rounds["beside app"].append((b["bytes"], b["secs"], None, None))
                if not _same(alpha, pair.secondary, data_size):
                    raise RuntimeError("resync beside writes: disks differ afterwards")
                print(f"# round {rnd + 1} resync beside app writes: {b}", flush=True)
        finally:
            pair.stop()
        # runs of zeroes: a full sync of a Primary holding written zeroes
        zpair = _zero_pair(tmp, size, args.pair_config)
        try:
            zpair.start_nodes(tmp)
            for rnd in range(args.repeat):
                os.sync()
                c0 = _pair_cpu(zpair)
                zpair.cli("alpha" if rnd == 0 else "beta",
                          *(("primary", "--force") if rnd == 0 else ("invalidate",)))
                z = _wait_sync_done(zpair, "alpha")["last_sync"]
                z["cpu_s"] = round(_pair_cpu(zpair) - c0, 3)
                rounds["zeros"].append((z["total_bytes"], z["elapsed_s"], z["sent_bytes"],
                                        z["cpu_s"]))
                print(f"# round {rnd + 1} full sync of zeroes: {z}", flush=True)
            if not _same(zpair.disk, zpair.secondary, data_size):
                raise RuntimeError("zero sync: disks differ afterwards")
        finally:
            zpair.stop()
        print()
        print(f"{'case':<15} {'bytes':>12} {'resync s':>9} {'resync MB/s':>12} "
              f"{'on wire':>12} {'ms/MiB':>7} {'nbdcopy s':>10} {'nbdcopy MB/s':>13} "
              f"{'ms/MiB':>7} {'ratio':>6}")
        for name in rounds:
            total, secs, sent, cpu = sorted(rounds[name],
                                            key=lambda r: r[1])[len(rounds[name]) // 2]
            r_mbs = total / secs / 1e6 if secs else float("inf")
            sent = "" if sent is None else sent
            per = f"{cpu * 1e3 / (total / (1 << 20)):>7.2f}" if cpu is not None else " " * 7
            if name not in copies:
                print(f"{name:<15} {total:>12} {secs:>9.2f} {r_mbs:>12.1f} {sent:>12} {per}")
                continue
            nbytes = copies[name][0][0]
            nsecs = _median([c[1] for c in copies[name]])
            ncpu = _median([c[2] for c in copies[name]])
            n_mbs = nbytes / nsecs / 1e6
            print(f"{name:<15} {total:>12} {secs:>9.2f} {r_mbs:>12.1f} {sent:>12} {per} "
                  f"{nsecs:>10.2f} {n_mbs:>13.1f} {ncpu * 1e3 / (nbytes / (1 << 20)):>7.2f} "
                  f"{r_mbs / n_mbs:>5.2f}x")
        alone = _median([b["app_iops_alone"] for b in beside])
        during = _median([b["app_iops_during"] for b in beside])
        print(f"beside app: fio 4K randwrite QD32 on the Primary, {alone:.0f} IOPS before the "
              f"resync, {during:.0f} IOPS during it ({during / alone:.2f}x; c-min-rate "
              f"throttles the resync while the application writes)")
        n = args.repeat
        which = "the median" if n % 2 else f"the upper median (round {n // 2 + 1} of {n} by time)"
        print(f"(resync: {which} of {n} rounds; nbdcopy: the median; every round's figures "
              f"are in the '#' lines; zeros: written zeroes, not holes; ms/MiB: CPU of "
              f"both nodes, or of nbdcopy and both nbdkit, per MiB resynced or copied)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="tools/bench", description=__doc__)
    ap.add_argument("--mode", default="io", choices=("io", "replicated", "resync", "distance",
                                                     "all"),
                    help="io: standalone servers; replicated: + primary/secondary pair and "
                         "the qemu-storage-daemon mirror; resync: resync throughput; "
                         "distance: over a shaped link, beside rsync (tools/bench_distance.py)")
    ap.add_argument("--targets", help="comma list: blockrep, nbdkit, qemu-nbd, "
                                      "blockrep-repl, blockrep-repl-tls (the link over "
                                      "TLS), qsd-mirror-unix, qsd-mirror-tcp; a "
                                      "blockrep target + '-nbdtls' serves NBD over TLS "
                                      "(tls = require, nbds:// URI), e.g. blockrep-nbdtls, "
                                      "blockrep-repl-tls-nbdtls; + '-poll' runs it with "
                                      "busy polling")
    ap.add_argument("--workloads", default=DEFAULT_WORKLOADS,
                    help=f"comma list of {', '.join(WORKLOADS)} (default: {DEFAULT_WORKLOADS})")
    ap.add_argument("--runtime", type=int, default=6, help="seconds per fio run")
    ap.add_argument("--repeat", type=int, default=3, help="rounds per workload (median)")
    ap.add_argument("--size-mib", type=int, default=1024, help="backing file size")
    ap.add_argument("--dir", help="where the backing files go (default: a temp dir)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--pair-config", action="append", default=[], metavar="LINE",
                    help="--mode resync: a line for both nodes' [resource], e.g. "
                         "'resync-window = 128' (repeatable)")
    ap.add_argument("--baseline", help="another blockrep checkout (with its .venv): targets "
                                       "NAME@base run from it, e.g. blockrep-repl@base")
    bench_distance.add_arguments(ap)
    args = ap.parse_args(argv)
    if args.mode == "distance":
        return bench_distance.run_distance_bench(args)
    for tool in ("fio", "nbdkit", "qemu-nbd", "nbdcopy"):
        if not shutil.which(tool):
            raise SystemExit(f"tools/bench needs {tool} (run tools/setup)")
    if args.mode in ("io", "all", "replicated"):
        if args.targets is None:
            args.targets = "blockrep,blockrep-nbdtls,nbdkit,qemu-nbd" if args.mode == "io" \
                else "blockrep,blockrep-nbdtls,nbdkit,qemu-nbd,blockrep-repl," \
                "blockrep-repl-tls,blockrep-repl-nbdtls,blockrep-repl-tls-nbdtls," \
                "qsd-mirror-unix,qsd-mirror-tcp"
        run_io_bench(args)
    if args.mode in ("resync", "all"):
        run_resync_bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
