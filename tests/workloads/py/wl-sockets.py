# Self-checking socket workload for tests/sockets_faithful.rs: sets up sockets in the state
# named by argv[1], says "ready", waits for a line on stdin (the test checkpoints, kills and
# restores it meanwhile), then checks that state itself and prints PASS or FAIL with why.
import array, ctypes, errno, os, select, socket, struct, sys, time

SOL, IP, IP6, TCP = socket.SOL_SOCKET, socket.IPPROTO_IP, socket.IPPROTO_IPV6, socket.IPPROTO_TCP
# SO_REUSEADDR, SO_REUSEPORT, SO_KEEPALIVE, SO_BROADCAST, SO_DONTROUTE, SO_OOBINLINE,
# SO_SNDBUF, SO_RCVBUF, SO_RCVLOWAT, SO_PRIORITY, SO_MARK, SO_PASSCRED, SO_PASSSEC,
# SO_TIMESTAMP, SO_TIMESTAMPNS, SO_NO_CHECK, SO_PEEK_OFF, SO_LOCK_FILTER
SOL_INTS = (2, 15, 9, 6, 5, 10, 7, 8, 18, 12, 36, 16, 34, 29, 35, 11, 42, 44)
# SO_LINGER, SO_RCVTIMEO, SO_SNDTIMEO, SO_BINDTODEVICE
SOL_BYTES = ((13, 8), (20, 16), (21, 16), (25, 16))
# IP_TOS, IP_TTL, IP_MULTICAST_TTL, IP_MULTICAST_LOOP, IP_RECVERR, IP_PKTINFO, IP_RECVTOS,
# IP_FREEBIND, IP_TRANSPARENT, IP_MTU_DISCOVER, IP_MULTICAST_IF, IP_RECVTTL
IP_INTS = (1, 2, 33, 34, 11, 8, 13, 15, 19, 10, 32, 12)
# IPV6_V6ONLY, IPV6_UNICAST_HOPS, IPV6_MULTICAST_HOPS, IPV6_MULTICAST_LOOP, IPV6_RECVERR,
# IPV6_RECVPKTINFO, IPV6_TCLASS, IPV6_RECVTCLASS, IPV6_MTU_DISCOVER, IPV6_RECVHOPLIMIT,
# IPV6_FREEBIND, IPV6_TRANSPARENT
IP6_INTS = (26, 16, 18, 19, 25, 49, 67, 66, 23, 51, 78, 75)
# TCP_NODELAY, TCP_CORK, TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT, TCP_USER_TIMEOUT,
# TCP_NOTSENT_LOWAT, TCP_DEFER_ACCEPT, TCP_FASTOPEN, TCP_SYNCNT, TCP_LINGER2
TCP_INTS = (1, 3, 4, 5, 6, 18, 25, 9, 23, 7, 8)
TCP_CONGESTION = 13
fails = []


def check(ok, what):
    if not ok:
        fails.append(what)


def snap(s):
    """Every option of the socket's kind that the test compares, as bytes (or errno)."""
    opts = [(SOL, n, 4) for n in SOL_INTS] + [(SOL, n, size) for n, size in SOL_BYTES]
    if s.family in (socket.AF_INET, socket.AF_INET6):
        opts += [(IP, n, 4) for n in IP_INTS]
    if s.family == socket.AF_INET6:
        opts += [(IP6, n, 4) for n in IP6_INTS]
    if s.type == socket.SOCK_STREAM and s.family != socket.AF_UNIX:
        opts += [(TCP, n, 4) for n in TCP_INTS] + [(TCP, TCP_CONGESTION, 16)]
    out = {}
    for level, name, size in opts:
        try:
            out[(level, name)] = s.getsockopt(level, name, size)
        except OSError as e:
            out[(level, name)] = e.errno
    return out


def same(label, s, before):
    after = snap(s)
    for k, v in before.items():
        check(after.get(k) == v, f"{label} option {k}: {v!r} became {after.get(k)!r}")


def linger(on, secs):
    return struct.pack("ii", on, secs)


def timeval(sec, usec):
    return struct.pack("ll", sec, usec)


def wait_go():
    print("ready", flush=True)
    sys.stdin.readline()


def finish():
    print("PASS" if not fails else "FAIL " + "; ".join(fails), flush=True)


def sockopts():
    lst = socket.socket()
    for level, name, v in [(SOL, 2, 1), (SOL, 15, 1), (SOL, 9, 1), (IP, 1, 0x10), (SOL, 12, 3),
                           (IP, 15, 1), (TCP, 4, 77), (TCP, 18, 1234), (TCP, 25, 4096),
                           (TCP, 9, 5), (TCP, 23, 5), (TCP, 7, 3)]:
        lst.setsockopt(level, name, v)
    lst.setsockopt(SOL, 20, timeval(2, 500000))
    lst.setsockopt(TCP, TCP_CONGESTION, b"reno")
    lst.bind(("127.0.0.1", 0))
    lst.listen(3)
    unb = socket.socket()
    for level, name, v in [(SOL, 2, 1), (SOL, 9, 1), (TCP, 1, 1), (TCP, 3, 1), (SOL, 36, 7),
                           (IP, 2, 33), (TCP, 6, 4), (TCP, 5, 9), (SOL, 10, 1), (SOL, 5, 1),
                           (TCP, 8, 11)]:
        unb.setsockopt(level, name, v)
    unb.setsockopt(SOL, 13, linger(1, 3))
    unb.setsockopt(SOL, 21, timeval(1, 0))
    unb.setsockopt(SOL, 25, b"lo")
    bnd = socket.socket()
    bnd.setsockopt(SOL, 2, 1)
    bnd.bind(("127.0.0.1", 0))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for level, name, v in [(SOL, 6, 1), (IP, 1, 0x28), (IP, 2, 17), (IP, 33, 5), (IP, 34, 0),
                           (IP, 11, 1), (IP, 8, 1), (IP, 13, 1), (IP, 10, 2), (SOL, 29, 1),
                           (SOL, 11, 1), (SOL, 8, 65536), (SOL, 12, 5), (IP, 19, 1), (IP, 12, 1)]:
        udp.setsockopt(level, name, v)
    udp.setsockopt(IP, 32, socket.inet_aton("127.0.0.1"))
    udp.bind(("127.0.0.1", 0))
    udp.connect(("127.0.0.1", 9))
    socks = {"listener": lst, "unbound tcp": unb, "bound tcp": bnd, "udp": udp}
    try:
        udp6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        for level, name, v in [(IP6, 26, 1), (IP6, 16, 9), (IP6, 67, 0x20), (IP6, 49, 1),
                               (IP6, 18, 3), (IP6, 25, 1)]:
            udp6.setsockopt(level, name, v)
        udp6.bind(("::1", 0))
        socks["udp6"] = udp6
    except OSError:
        pass
    s1, s2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    s1.setsockopt(SOL, 7, 50000)
    s2.setsockopt(SOL, 16, 1)
    s2.setsockopt(SOL, 20, timeval(4, 0))
    s2.setsockopt(SOL, 18, 3)
    d1, d2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    d1.setsockopt(SOL, 21, timeval(0, 250000))
    d2.setsockopt(SOL, 16, 1)
    d2.setsockopt(SOL, 8, 40000)
    d2.setsockopt(SOL, 29, 1)
    socks.update({"unix stream a": s1, "unix stream b": s2, "unix dgram a": d1,
                  "unix dgram b": d2})
    before = {k: (snap(s), s.getsockname()) for k, s in socks.items()}
    udp_peer = udp.getpeername()
    wait_go()
    for k, s in socks.items():
        same(k, s, before[k][0])
        check(s.getsockname() == before[k][1], f"{k} name {s.getsockname()} was {before[k][1]}")
    check(udp.getpeername() == udp_peer, "udp peer")
    d1.send(b"dg")
    check(d2.recv(10) == b"dg", "unix dgram pair carries data")
    finish()


def expect_errno(f, code, what):
    try:
        f()
        fails.append(f"{what}: no error")
    except OSError as e:
        check(e.errno == code, f"{what}: errno {e.errno}, not {code}")


def shutdown():
    s1, s2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    s1.shutdown(socket.SHUT_WR)
    s3, s4 = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    s3.shutdown(socket.SHUT_RD)
    d1, d2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    d1.shutdown(socket.SHUT_RD)
    u1 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u1.bind(("127.0.0.1", 0))
    u2 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u2.bind(("127.0.0.1", 0))
    u1.connect(u2.getsockname())
    u2.connect(u1.getsockname())
    u1.shutdown(socket.SHUT_RD)
    u2.shutdown(socket.SHUT_RDWR)
    wait_go()
    check(s2.recv(10, socket.MSG_DONTWAIT) == b"", "unix stream: no end of file after SHUT_WR")
    expect_errno(lambda: s1.send(b"x"), errno.EPIPE, "unix stream: send after SHUT_WR")
    s2.send(b"back")
    check(s1.recv(10) == b"back", "unix stream: the other direction is open")
    check(s3.recv(10, socket.MSG_DONTWAIT) == b"", "unix stream: no end of file after SHUT_RD")
    expect_errno(lambda: d2.send(b"x"), errno.EPIPE, "unix dgram: send to a SHUT_RD socket")
    d1.send(b"out")
    check(d2.recv(10) == b"out", "unix dgram: the other direction is open")

    def events(s):
        p = select.poll()
        p.register(s, select.POLLIN | select.POLLRDHUP)
        return dict(p.poll(0)).get(s.fileno(), 0)
    e1, e2 = events(u1), events(u2)
    check(e1 & select.POLLRDHUP and not e1 & select.POLLHUP, f"udp SHUT_RD: poll {e1:#x}")
    check(e2 & select.POLLHUP, f"udp SHUT_RDWR: poll {e2:#x}")
    finish()


def relative():
    os.makedirs("sub", exist_ok=True)
    os.chdir("sub")
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind("rel.sock")
    lst.listen(2)
    dg = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dg.bind("rel.dgram")
    wait_go()
    check(lst.getsockname() == "rel.sock", f"listener name {lst.getsockname()!r}")
    check(dg.getsockname() == "rel.dgram", f"dgram name {dg.getsockname()!r}")
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        c.connect("rel.sock")
        a, _ = lst.accept()
        c.send(b"hi")
        check(a.recv(10) == b"hi", "accepted connection carries data")
    except OSError as e:
        fails.append(f"connecting to rel.sock: {e}")
    t = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        t.sendto(b"dg", "rel.dgram")
        dg.settimeout(5)
        check(dg.recv(10) == b"dg", "datagram to rel.dgram")
    except OSError as e:
        fails.append(f"sending to rel.dgram: {e}")
    finish()


def relative_moved():
    os.makedirs("sub", exist_ok=True)
    os.chdir("sub")
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind("moved.sock")
    lst.listen(2)
    os.chdir("..")
    wait_go()
    finish()


def rights(*fds):
    return [(SOL, socket.SCM_RIGHTS, array.array("i", fds))]


def recv_fds(s):
    _, anc, _, _ = s.recvmsg(10, socket.CMSG_SPACE(4 * 16))
    fds = []
    for _, _, raw in anc:
        a = array.array("i")
        a.frombytes(raw[:len(raw) - len(raw) % 4])
        fds += list(a)
    return fds


def scm():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    x, y = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    p, q = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("127.0.0.1", 0))
    t = socket.socket()
    t.setsockopt(SOL, 2, 1)
    t.bind(("127.0.0.1", 0))
    ln = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ln.bind("\0stasis-scm-%d" % os.getpid())
    ln.listen(1)
    a.sendmsg([b"M"], rights(x.fileno(), u.fileno(), p.fileno(), t.fileno(), ln.fileno()))
    a.sendmsg([b"N"], rights(q.fileno(), y.fileno()))
    # An empty datagram carrying a socket, already peeked by the process, then another.
    d1, d2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    e1 = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    e1.bind("\0stasis-scm-e1-%d" % os.getpid())
    e2 = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    e2.bind("\0stasis-scm-e2-%d" % os.getpid())
    d1.sendmsg([b""], rights(e1.fileno()))
    d1.sendmsg([b"e"], rights(e2.fileno()))
    d2.recvmsg(1, socket.CMSG_SPACE(4), socket.MSG_PEEK)
    empties = [e1.getsockname(), e2.getsockname()]
    names = [u.getsockname(), t.getsockname(), ln.getsockname()]
    gr, gw = os.pipe()
    pid = os.fork()
    if pid == 0:
        a.close()
        os.close(gw)
        os.read(gr, 1)
        got = recv_fds(b) + recv_fds(b)
        f = [socket.socket(fileno=k) for k in got]
        res = []
        res.append(len(f) == 7)
        if len(f) == 7:
            res.append([f[1].getsockname(), f[3].getsockname(), f[4].getsockname()] == names)
            res.append(f[3].getsockopt(SOL, 2) != 0)
            f[0].send(b"to-y")
            f[6].settimeout(5)
            res.append(f[6].recv(10) == b"to-y")
            f[2].send(b"to-q")
            f[5].settimeout(5)
            res.append(f[5].recv(10) == b"to-q")
        os._exit(0 if all(res) else 1)
    b.close()
    os.close(gr)
    wait_go()
    os.write(gw, b"g")
    d2.settimeout(5)
    try:
        got = [socket.socket(fileno=k).getsockname() for _ in range(2) for k in recv_fds(d2)]
        check(got == empties, f"datagrams carried {got}, not {empties}")
    except OSError as e:
        fails.append(f"receiving the datagrams with sockets: {e}")
    _, st = os.waitpid(pid, 0)
    check(st == 0, f"the child found its sockets wrong (status {st})")
    finish()


def cbpf(*insns):
    """A struct sock_fprog for the instructions (kept alive in a global)."""
    global _prog
    _prog = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in insns))
    return struct.pack("HL", len(insns), ctypes.addressof(_prog))


def filters():
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("127.0.0.1", 0))
    # Accept a datagram only if its first byte (after the 8-byte UDP header) is 'A'.
    keep_a = cbpf((0x30, 0, 0, 8), (0x15, 0, 1, 0x41), (0x06, 0, 0, 0xFFFFFFFF), (0x06, 0, 0, 0))
    u.setsockopt(SOL, 26, keep_a)
    d1, d2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    d2.setsockopt(SOL, 26, cbpf((0x06, 0, 0, 0)))
    d2.setsockopt(SOL, 44, 1)
    wait_go()
    t = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    t.sendto(b"B-dropped", u.getsockname())
    t.sendto(b"A-kept", u.getsockname())
    time.sleep(0.2)
    u.setblocking(False)
    try:
        check(u.recv(20) == b"A-kept", "udp filter: the first datagram is not A-kept")
        u.recv(20)
        fails.append("udp filter: a datagram it drops came through")
    except BlockingIOError:
        pass
    try:
        d1.send(b"x")
    except OSError:
        pass
    d2.setblocking(False)
    expect_errno(lambda: d2.recv(10), errno.EAGAIN, "unix filter dropping everything")
    check(d2.getsockopt(SOL, 44) == 1, "SO_LOCK_FILTER lost")
    expect_errno(lambda: d2.setsockopt(SOL, 27, 0), errno.EPERM,
                 "detaching a locked filter")
    finish()


def ebpf():
    libc = ctypes.CDLL(None, use_errno=True)
    insns = struct.pack("BBhi", 0xB7, 0, 0, 0) + struct.pack("BBhi", 0x95, 0, 0, 0)
    prog = ctypes.create_string_buffer(insns)
    lic = ctypes.create_string_buffer(b"GPL")
    attr = ctypes.create_string_buffer(128)
    struct.pack_into("IIQQ", attr, 0, 1, 2, ctypes.addressof(prog), ctypes.addressof(lic))
    fd = libc.syscall(321, 5, attr, 128)
    if fd < 0:
        print("ready skip bpf", os.strerror(ctypes.get_errno()), flush=True)
        sys.stdin.readline()
        return
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.setsockopt(SOL, 50, struct.pack("i", fd))
    os.close(fd)
    wait_go()
    finish()


def multicast():
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        u.setsockopt(IP, socket.IP_ADD_MEMBERSHIP,
                     socket.inet_aton("239.1.2.3") + socket.inet_aton("127.0.0.1"))
    except OSError as e:
        print("ready skip", e, flush=True)
        sys.stdin.readline()
        return
    wait_go()
    finish()


{"sockopts": sockopts, "shutdown": shutdown, "relative": relative,
 "relative-moved": relative_moved, "scm": scm, "filters": filters, "ebpf": ebpf,
 "multicast": multicast}[sys.argv[1]]()
