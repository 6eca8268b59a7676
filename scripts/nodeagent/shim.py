"""The container runtime of a process node, one short-lived process per container start.

    python shim.py run SPEC.json           become the container: namespaces, root file system, mounts, user, exec
    python shim.py enter PID SPEC.json     run a command inside the running container PID (exec probes, preStop)

`run` joins the pod's network namespace and the container's cgroups, makes a private mount, UTS and IPC
namespace, builds a root file system on a tmpfs (the host's top-level folders bound or overlaid into it, a
minimal /dev, the pod's volumes at their mount paths), chroots into it, drops to the pod's user and groups
and execs the container's command: the process the node agent started *is* the container's main process.

This file runs as its own program (no imports from the agent) and only with the standard library, so it is
quick to start and has nothing of the agent's state.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
PR_SET_NO_NEW_PRIVS = 38
EXIT_START_ERROR = 128  # what a container runtime reports when the command could not be started

# host folders never bound into a container's root: made fresh or left out
SPECIAL = {"proc", "sys", "dev", "tmp", "run", "lost+found"}
FRESH = ("tmp", "run")  # the container's own, empty: not the host's
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")

_libc = ctypes.CDLL(None, use_errno=True)


class ShimError(Exception):
    pass


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise ShimError(f"{what}: {os.strerror(err)}")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(_libc.mount(source.encode() if source else None, target.encode(), fstype.encode() if fstype else None,
                       ctypes.c_ulong(flags), data.encode() if data else None),
           f"mount {source or fstype or ''} on {target}")


def setns(path: str, nstype: int) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        _check(_libc.setns(fd, nstype), f"setns {path}")
    finally:
        os.close(fd)


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_libc.sethostname(raw, len(raw)), "sethostname")


def no_new_privs() -> None:
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")


def _touch(path: str) -> None:
    if not os.path.lexists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a"):
            pass


def _inside(root: str, path: str) -> str:
    return os.path.join(root, path.lstrip("/"))


def _in_root(root: str, path: str) -> str:
    """`path` inside the container's root, its symlinks followed as the container sees them (an absolute
    link such as /var/run -> /run points into the root, never out to the host's)."""
    parts = [p for p in path.split("/") if p and p != "."]
    resolved: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = os.path.join(root, *resolved, part)
        if os.path.islink(candidate):
            hops += 1
            if hops > 40:
                raise ShimError(f"{path}: too many symbolic links")
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p and p != "."] + parts
            continue
        resolved.append(part)
    return os.path.join(root, *resolved)


def _bind_host_folder(root: str, scratch: str, name: str) -> None:
    """A host top-level folder in the container's root, overlaid so the container's writes (and the
    permission changes below) land in its own scratch space, never on the host; bound read-only where
    overlayfs cannot stack."""
    target = _inside(root, name)
    os.mkdir(target)
    upper, work = os.path.join(scratch, "upper", name), os.path.join(scratch, "work", name)
    os.makedirs(upper)
    os.makedirs(work)
    try:
        mount("overlay", target, "overlay", 0, f"lowerdir=/{name},upperdir={upper},workdir={work}")
    except ShimError:
        mount(f"/{name}", target, None, MS_BIND | MS_REC)
        mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY)


def build_root(spec: dict) -> str:
    root, scratch = spec["root"], spec["scratch"]
    mount("tmpfs", scratch, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755")
    mount("tmpfs", root, "tmpfs", MS_NOSUID, "mode=755")
    readonly_root = spec.get("readOnlyRoot", False)
    folders = []
    for name in sorted(os.listdir("/")):
        host = "/" + name
        if name in SPECIAL:
            continue
        if os.path.islink(host):
            os.symlink(os.readlink(host), _inside(root, name))
        elif os.path.isdir(host):
            _bind_host_folder(root, scratch, name)
            folders.append(_inside(root, name))
        elif os.path.isfile(host):
            _touch(_inside(root, name))
            mount(host, _inside(root, name), None, MS_BIND)
    # the image's interpreter lives in the host's folders: make the way to it passable for the container's user
    for path in spec.get("traverse", []):
        target = _in_root(root, path)
        os.chmod(target, os.stat(target).st_mode & 0o7777 | 0o001)
    for name in ("proc", "sys"):
        os.mkdir(_inside(root, name))
        mount("/" + name, _inside(root, name), None, MS_BIND | MS_REC)
    for m in spec.get("cgroupMounts", []):
        target = _inside(root, os.path.realpath(m["target"]))
        if os.path.isdir(target):
            mount(m["source"], target, None, MS_BIND)
            mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY)
    dev = _inside(root, "dev")
    os.mkdir(dev)
    mount("tmpfs", dev, "tmpfs", MS_NOSUID, "mode=755")
    for name in DEVICES:
        if os.path.exists("/dev/" + name):
            _touch(os.path.join(dev, name))
            mount("/dev/" + name, os.path.join(dev, name), None, MS_BIND)
    os.mkdir(os.path.join(dev, "pts"))
    if os.path.isdir("/dev/pts"):
        mount("/dev/pts", os.path.join(dev, "pts"), None, MS_BIND | MS_REC)
    for link, to in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                     ("stderr", "/proc/self/fd/2"), ("ptmx", "pts/ptmx")):
        os.symlink(to, os.path.join(dev, link))
    os.mkdir(os.path.join(dev, "shm"))
    mount("tmpfs", os.path.join(dev, "shm"), "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777,size=64m")
    # /tmp and /run belong to the container's own root: writable unless the root is read-only
    for name, mode in (("tmp", 0o1777), ("run", 0o755)):
        os.mkdir(_inside(root, name))
        os.chmod(_inside(root, name), mode)
    for m in sorted(spec.get("mounts", []), key=lambda m: m["target"].rstrip("/").count("/")):
        target = _in_root(root, m["target"])
        if os.path.isdir(m["source"]):
            os.makedirs(target, exist_ok=True)
        else:
            _touch(target)
        mount(m["source"], target, None, MS_BIND | MS_REC)
        if m.get("readOnly"):
            mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY)
    # the image's own files (the project and its interpreter) where they sit in a folder the container gets fresh
    # or a volume covers (a checkout under /tmp, and an emptyDir at /tmp): a real image keeps them elsewhere, so
    # they stay visible, read-only as an image's layers are
    for path in spec.get("imagePaths", []):
        if path.strip("/").split("/")[0] in FRESH:
            target = _in_root(root, path)
            os.makedirs(target, exist_ok=True)
            mount(path, target, None, MS_BIND | MS_REC)
            mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY)
    cwd = _in_root(root, spec.get("cwd") or "/")
    if not os.path.isdir(cwd):
        os.makedirs(cwd, exist_ok=True)
        os.chown(cwd, spec.get("uid", 0), spec.get("gid", 0))
    if readonly_root:
        for target in folders:
            mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY)
        mount(None, root, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID)
    return root


def drop_privileges(spec: dict) -> None:
    uid, gid = spec.get("uid", 0), spec.get("gid", 0)
    os.setgroups(sorted(set(spec.get("groups", [])) | {gid}))
    os.setgid(gid)
    os.setuid(uid)
    if spec.get("noNewPrivs"):
        no_new_privs()


def _exec(spec: dict) -> None:
    argv, env = spec["argv"], spec["env"]
    if not argv:
        raise ShimError("no command: the container gives none and its image has no entrypoint")
    try:
        os.execvpe(argv[0], argv, env)
    except FileNotFoundError:
        raise ShimError(f'exec: "{argv[0]}": executable file not found in $PATH') from None
    except PermissionError:
        raise ShimError(f'exec: "{argv[0]}": permission denied') from None


def run(spec: dict) -> None:
    for procs in spec.get("cgroups", []):
        with open(procs, "w") as f:
            f.write(str(os.getpid()))
    setns(spec["netns"], CLONE_NEWNET)
    unshare(CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC)
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    sethostname(spec["hostname"])
    root = build_root(spec)
    os.chdir(root)
    os.chroot(".")
    os.chdir(spec.get("cwd") or "/")
    drop_privileges(spec)
    _exec(spec)


def enter(pid: int, spec: dict) -> None:
    """Into the namespaces and root of a running container, as its user; then exec."""
    for procs in spec.get("cgroups", []):
        with open(procs, "w") as f:
            f.write(str(os.getpid()))
    fds = {ns: os.open(f"/proc/{pid}/ns/{ns}", os.O_RDONLY) for ns in ("net", "uts", "ipc", "mnt")}
    root_fd = os.open(f"/proc/{pid}/root", os.O_RDONLY)
    for ns, flag in (("net", CLONE_NEWNET), ("uts", CLONE_NEWUTS), ("ipc", CLONE_NEWIPC), ("mnt", CLONE_NEWNS)):
        _check(_libc.setns(fds[ns], flag), f"setns {ns}")
        os.close(fds[ns])
    os.fchdir(root_fd)
    os.chroot(".")
    os.close(root_fd)
    os.chdir(spec.get("cwd") or "/")
    drop_privileges(spec)
    _exec(spec)


def main(argv: list[str]) -> int:
    try:
        if argv[:1] == ["run"] and len(argv) == 2:
            spec = json.loads(open(argv[1]).read())
            # opened now, while the host's file system is still in view (Python's fds close on exec)
            error_fd = os.open(spec["errorFile"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600) \
                if spec.get("errorFile") else None
            try:
                run(spec)
            except (ShimError, OSError) as exc:
                if error_fd is not None:
                    os.write(error_fd, str(exc).encode())
                print(f"process-node: cannot start the container: {exc}", file=sys.stderr, flush=True)
                return EXIT_START_ERROR
        elif argv[:1] == ["enter"] and len(argv) == 3:
            spec = json.loads(open(argv[2]).read())
            try:
                enter(int(argv[1]), spec)
            except (ShimError, OSError) as exc:
                print(f"process-node: cannot run in the container: {exc}", file=sys.stderr, flush=True)
                return EXIT_START_ERROR
        else:
            print("usage: shim.py run SPEC.json | enter PID SPEC.json", file=sys.stderr)
            return 2
    except Exception as exc:  # noqa: BLE001: any failure is the container's start error
        print(f"process-node: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return EXIT_START_ERROR
    return 0  # not reached: exec replaced this process


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
