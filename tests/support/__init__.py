"""Test helpers, in one place: import them as `support.<module>` (tests/ is on sys.path,
see tests/conftest.py).

- helpers: free ports, deadlines, processes, tools (require_tool), `blockrep serve` runs
- cluster: a two-node resource on loopback driven through its CLI and admin sockets
- repltools: fio and qemu-io runs against a node's export, comparing the nodes' disks
- nbd_testlib: a raw-socket NBD client and a runner for python3-libnbd scripts
- faulttools: the fault toolkit (blockrep/faults) put into a Cluster: link proxy, faulty disk
- inprocess: the shell in-process: two Nodes on one event loop joined by an in-memory link,
  an in-process FaultyDisk (fail chosen calls/ranges, hold thread calls to reorder them)
"""
