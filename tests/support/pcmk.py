"""A two-node Pacemaker/Corosync cluster started by a test, without systemd.

Each node is a network namespace (two veth pairs to the other node: 10.77.0.0/24 carries
Corosync and NBD, 10.77.1.0/24 the blockrep replication link, so the replication link can be
cut alone) holding one process tree in `unshare --mount --uts --pid --fork --kill-child
--mount-proc`: a bash as the namespace's init mounts its own tmpfs /run and /dev/shm, binds
per-node directories over /var/lib/pacemaker, /var/lib/corosync, /etc/corosync and
/var/log/pacemaker, binds the checkout's ocf/ over /usr/lib/ocf/resource.d/blockrep (so the
agent under test is the one Pacemaker runs), then starts `corosync -f` and `pacemakerd`.
Killing the unshare process (SIGKILL) kills the whole node at once. Everything is removed
by Pacemaker.close(): processes by PID, namespaces with `ip netns delete`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import textwrap
import time

from support.helpers import ROOT, run, wait_for

NODES = ("alpha", "beta")
CLUSTER_NET = {"alpha": "10.77.0.1", "beta": "10.77.0.2"}
REPL_NET = {"alpha": "10.77.1.1", "beta": "10.77.1.2"}
AGENT_DIR = "/usr/lib/ocf/resource.d/blockrep"  # created by tools/setup (the bind target)

COROSYNC_CONF = """\
totem {{
    version: 2
    cluster_name: blockrep-test
    transport: knet
    crypto_cipher: none
    crypto_hash: none
    token: 1000
    join: 50
    consensus: 1200
}}
nodelist {{
    node {{
        ring0_addr: {alpha}
        name: alpha
        nodeid: 1
    }}
    node {{
        ring0_addr: {beta}
        name: beta
        nodeid: 2
    }}
}}
quorum {{
    provider: corosync_votequorum
    two_node: 1
}}
logging {{
    to_stderr: yes
    to_logfile: no
    to_syslog: no
    timestamp: on
}}
"""

# The initial CIB of both nodes: no fencing (a test bed), a short DC election wait
SEED_CIB = """\
<cib validate-with="pacemaker-3.9" epoch="1" num_updates="0" admin_epoch="0">
  <configuration>
    <crm_config>
      <cluster_property_set id="cib-bootstrap-options">
        <nvpair id="opt-stonith" name="stonith-enabled" value="false"/>
        <nvpair id="opt-dc-deadtime" name="dc-deadtime" value="2s"/>
      </cluster_property_set>
    </crm_config>
    <nodes/>
    <resources/>
    <constraints/>
  </configuration>
  <status/>
</cib>
"""

INIT = """\
set -e
hostname {node}
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount --bind {d}/lib-pacemaker /var/lib/pacemaker
mount --bind {d}/lib-corosync /var/lib/corosync
mount --bind {d}/etc-corosync /etc/corosync
mount --bind {d}/log-pacemaker /var/log/pacemaker
mount --bind {ocf} {agent_dir}
export PCMK_logfile=/var/log/pacemaker/pacemaker.log PCMK_logfacility=none
corosync -f -c /etc/corosync/corosync.conf > {d}/corosync.log 2>&1 &
for i in $(seq 200); do corosync-cfgtool -s > /dev/null 2>&1 && break; sleep 0.05; done
pacemakerd > {d}/pacemakerd.log 2>&1 &
echo started > {d}/init.ready
set +e
while :; do wait; sleep 0.2; done
"""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(["ip", *args], timeout=30, check=check)


class Pacemaker:
    def __init__(self, base: str):
        self.base = base
        tag = f"{os.getpid() % 10000}{random.randrange(1 << 12):03x}"
        self.ns = {n: f"pc{n[0]}{tag}" for n in NODES}
        self.veth = {(n, net): f"v{net}{n[0]}{tag}" for n in NODES for net in "cr"}
        self.procs: dict[str, subprocess.Popen] = {}
        self.dirs = {n: os.path.join(base, f"pcmk-{n}") for n in NODES}

    # -- network -----------------------------------------------------------------------------
    def make_network(self) -> None:
        for n in NODES:
            _ip("netns", "add", self.ns[n])
            _ip("-n", self.ns[n], "link", "set", "lo", "up")
        for net, addrs in (("c", CLUSTER_NET), ("r", REPL_NET)):
            a, b = self.veth[("alpha", net)], self.veth[("beta", net)]
            _ip("link", "add", a, "type", "veth", "peer", "name", b)
            for n in NODES:
                dev = self.veth[(n, net)]
                _ip("link", "set", dev, "netns", self.ns[n])
                _ip("-n", self.ns[n], "addr", "add", f"{addrs[n]}/24", "dev", dev)
                _ip("-n", self.ns[n], "link", "set", dev, "up")

    def set_link(self, node: str, net: str, up: bool) -> None:
        """Take node's end of the cluster ("c") or replication ("r") veth down or up."""
        _ip("-n", self.ns[node], "link", "set", self.veth[(node, net)],
            "up" if up else "down")

    # -- nodes -------------------------------------------------------------------------------
    def prepare(self, node: str) -> None:
        d = self.dirs[node]
        for sub in ("lib-pacemaker/cib", "lib-pacemaker/pengine", "lib-pacemaker/blackbox",
                    "lib-pacemaker/cores", "lib-corosync", "etc-corosync", "log-pacemaker"):
            os.makedirs(os.path.join(d, sub), exist_ok=True)
        for sub in ("lib-pacemaker", "lib-pacemaker/cib", "lib-pacemaker/pengine",
                    "lib-pacemaker/blackbox", "lib-pacemaker/cores", "log-pacemaker"):
            shutil.chown(os.path.join(d, sub), "hacluster", "haclient")
            os.chmod(os.path.join(d, sub), 0o770)
        with open(os.path.join(d, "etc-corosync", "corosync.conf"), "w") as f:
            f.write(COROSYNC_CONF.format(**CLUSTER_NET))
        cib = os.path.join(d, "lib-pacemaker", "cib", "cib.xml")
        if not os.path.exists(cib):
            with open(cib, "w") as f:
                f.write(SEED_CIB)
            shutil.chown(cib, "hacluster", "haclient")
            os.chmod(cib, 0o600)

    def start_node(self, node: str) -> None:
        d = self.dirs[node]
        ready = os.path.join(d, "init.ready")
        if os.path.exists(ready):
            os.unlink(ready)
        script = INIT.format(node=node, d=d, ocf=os.path.join(ROOT, "ocf"),
                             agent_dir=AGENT_DIR)
        with open(os.path.join(d, "init.log"), "a") as log:
            self.procs[node] = subprocess.Popen(
                ["ip", "netns", "exec", self.ns[node], "unshare", "--mount", "--uts",
                 "--pid", "--fork", "--kill-child", "--mount-proc", "bash", "-c", script],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        p = self.procs[node]
        wait_for(lambda: p.poll() is not None or os.path.exists(ready), 30,
                 what=f"{node}: namespace init")
        if p.poll() is not None:
            raise AssertionError(f"{node}: init exited {p.returncode}: "
                                 f"{self.file(node, 'init.log')}")

    def init_pid(self, node: str) -> int:
        """PID (in the host's PID namespace) of the node's init: unshare's child."""
        p = self.procs[node]
        # ip netns exec execs unshare in place, so p.pid is unshare; its one child is init
        with open(f"/proc/{p.pid}/task/{p.pid}/children") as f:
            return int(f.read().split()[0])

    def kill_node(self, node: str) -> None:
        """Power loss: links down (no FIN, no RST reaches the peer), then SIGKILL to the whole
        process tree (unshare dies; --kill-child kills init; the PID namespace goes)."""
        for net in "cr":
            self.set_link(node, net, False)
        p = self.procs.pop(node)
        p.send_signal(signal.SIGKILL)
        p.wait(30)

    def exec(self, node: str, *argv: str, timeout: float = 30, check: bool = True,
             ) -> subprocess.CompletedProcess:
        """Run argv inside the node (its network, mount, UTS and PID namespaces)."""
        pid = self.init_pid(node)
        return run(["nsenter", "-t", str(pid), "-n", "-m", "-u", "-p", "--", *argv],
                   timeout=timeout, check=check)

    def file(self, node: str, name: str) -> str:
        try:
            with open(os.path.join(self.dirs[node], name), errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def close(self) -> None:
        for node in list(self.procs):
            p = self.procs.pop(node)
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait(30)
        for n in NODES:
            _ip("netns", "delete", self.ns[n], check=False)
        for key in self.veth.values():  # in case one was never moved into a namespace
            _ip("link", "delete", key, check=False)

    # -- Pacemaker ---------------------------------------------------------------------------
    def crm_mon(self, node: str) -> str:
        return self.exec(node, "crm_mon", "-1", "-A", "-f", "--output-as=text",
                         check=False).stdout

    def nodes_online(self, node: str) -> list[str]:
        """Names of the nodes `node`'s Pacemaker sees online (once a DC is elected)."""
        import xml.etree.ElementTree as ET
        r = self.exec(node, "crm_mon", "-1", "--output-as=xml", check=False)
        if r.returncode != 0:
            return []
        try:
            tree = ET.fromstring(r.stdout)
        except ET.ParseError:
            return []
        dc = tree.find("summary/current_dc")
        if dc is None or dc.get("present") != "true":
            return []
        return sorted(n.get("name") for n in tree.iter("node")
                      if n.get("online") == "true" and n.get("name"))

    def wait_online(self, nodes, timeout: float = 60) -> float:
        t0 = time.monotonic()
        try:
            wait_for(lambda: all(self.nodes_online(n) == sorted(nodes) for n in nodes),
                     timeout, 0.3, "cluster nodes online")
        except TimeoutError:
            raise AssertionError(f"cluster not online: {self.crm_mon(nodes[0])}\n"
                                 f"{self.file(nodes[0], 'pacemakerd.log')[-2000:]}\n"
                                 f"{self.file(nodes[0], 'corosync.log')[-2000:]}") from None
        return time.monotonic() - t0

    def cib(self, node: str, *argv: str) -> None:
        self.exec(node, "cibadmin", *argv)

    def promoted_on(self, node: str, rsc: str) -> list[str]:
        r = self.exec(node, "crm_resource", "--locate", "--resource", rsc, check=False)
        return sorted(line.split("running on:")[1].split()[0] for line in
                      r.stdout.splitlines() if "running on:" in line and "Promoted" in line)

    def running_on(self, node: str, rsc: str) -> list[str]:
        r = self.exec(node, "crm_resource", "--locate", "--resource", rsc, check=False)
        return sorted(line.split("running on:")[1].split()[0] for line in
                      r.stdout.splitlines() if "running on:" in line)


def clone_xml(config: str, blockrep: str) -> str:
    """A promotable clone of ocf:blockrep:blockrep, DRBD-style meta attributes."""
    return textwrap.dedent(f"""\
        <clone id="blockrep-clone">
          <meta_attributes id="blockrep-clone-meta">
            <nvpair id="bc-promotable" name="promotable" value="true"/>
            <nvpair id="bc-pmax" name="promoted-max" value="1"/>
            <nvpair id="bc-pnmax" name="promoted-node-max" value="1"/>
            <nvpair id="bc-cmax" name="clone-max" value="2"/>
            <nvpair id="bc-cnmax" name="clone-node-max" value="1"/>
            <nvpair id="bc-notify" name="notify" value="true"/>
          </meta_attributes>
          <primitive id="blockrep" class="ocf" provider="blockrep" type="blockrep">
            <instance_attributes id="blockrep-params">
              <nvpair id="bp-config" name="config" value="{config}"/>
              <nvpair id="bp-blockrep" name="blockrep" value="{blockrep}"/>
              <nvpair id="bp-wfc" name="wfc_timeout" value="5"/>
            </instance_attributes>
            <operations>
              <op id="bo-mon-p" name="monitor" interval="1s" timeout="20s" role="Promoted"/>
              <op id="bo-mon-u" name="monitor" interval="2s" timeout="20s" role="Unpromoted"/>
              <op id="bo-start" name="start" interval="0" timeout="60s"/>
              <op id="bo-stop" name="stop" interval="0" timeout="60s"/>
              <op id="bo-promote" name="promote" interval="0" timeout="60s"/>
              <op id="bo-demote" name="demote" interval="0" timeout="60s"/>
              <op id="bo-notify" name="notify" interval="0" timeout="30s"/>
            </operations>
          </primitive>
        </clone>""")


def status_json(path_admin: str, timeout: float = 5.0) -> dict | None:
    """One status request on a node's admin socket (a filesystem path: reachable from the
    host even though the node runs in its own network namespace)."""
    import socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path_admin)
            with s.makefile("rwb") as f:
                f.write(b'{"cmd": "status", "args": {}}\n')
                f.flush()
                reply = json.loads(f.readline())
    except (OSError, ValueError):
        return None
    return reply.get("result") if reply.get("ok") else None


def wait_until(pred, timeout: float, what: str, interval: float = 0.1):
    t0 = time.monotonic()
    wait_for(pred, timeout, interval, what)
    return time.monotonic() - t0
