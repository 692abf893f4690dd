"""Socket guard for a subprocess: ``python _socket_guard.py <module or script.py> [args...]``.

Non-loopback ``getaddrinfo``/``connect`` are refused (``ConnectionRefusedError``) and recorded, one JSON line
each, in the file named by ``SOCKET_LOG``; loopback and Unix sockets work as usual. Nothing leaves the machine.
"""


import ipaddress
import json
import os
import runpy
import socket
import sys

LOG = os.environ["SOCKET_LOG"]


def _local(host):
    host = host.decode() if isinstance(host, bytes) else str(host)
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _refuse(what, target):
    with open(LOG, "a") as log:
        log.write(json.dumps([what, repr(target)]) + "\n")
    raise ConnectionRefusedError(f"{what} {target!r} refused by the test's socket guard")


_getaddrinfo, _connect, _connect_ex = socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex


def getaddrinfo(host, *args, **kwargs):
    if host is not None and not _local(host):
        _refuse("getaddrinfo", host)
    return _getaddrinfo(host, *args, **kwargs)


def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _local(address[0]):
        _refuse("connect", address)
    return _connect(self, address)


def connect_ex(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _local(address[0]):
        _refuse("connect", address)
    return _connect_ex(self, address)


socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex = getaddrinfo, connect, connect_ex
target = sys.argv[1]
sys.argv = sys.argv[1:]
if target.endswith(".py"):
    runpy.run_path(target, run_name="__main__")
else:
    runpy.run_module(target, run_name="__main__", alter_sys=True)
