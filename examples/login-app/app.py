#!/usr/bin/env python3
"""The classic login flow, done safely, behind an authrealm sidecar.

Python 3 standard library only. The app never parses or verifies a JWT: the sidecar in
front of it does that (signature, claims and the session record in the Redis Cluster) and
hands the app the caller's identity in the `X-Auth-Subject` / `X-Auth-Jti` headers. The app
only checks passwords and asks the sidecar's loopback issuer API to mint or revoke tokens.

    python3 app.py serve              # listen (default 127.0.0.1:8080)
    python3 app.py hash alice         # prompt for a password, add/replace alice in users.json
    python3 app.py hash alice --print # print the entry instead of writing the file
    python3 app.py check              # validate users.json and exit

Endpoints (the sidecar's config makes only `POST /login` public):

    POST /login              {"username","password"} (JSON or form) -> the sidecar's token JSON
    POST /logout             revokes the token of this request        (X-Auth-Jti)
    POST /logout-everywhere  revokes every token of this user         (X-Auth-Subject)
    GET  /me                 the identity headers the sidecar set

Environment:
    LOGIN_APP_LISTEN       host:port to listen on        (default 127.0.0.1:8080)
    LOGIN_APP_USERS        users file                    (default users.json next to app.py)
    LOGIN_APP_ISSUER_URL   the sidecar's issuer API      (default http://127.0.0.1:8444)
    LOGIN_APP_TOKEN_TTL    token lifetime to ask for, s  (default: the realm's default)

The app must only be reachable through the sidecar (listen on loopback inside the pod):
anyone who can reach it directly could send their own X-Auth-* headers.
"""

import argparse
import base64
import getpass
import hashlib
import hmac
import http.client
import json
import os
import secrets
import sys
import tempfile
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

USERS_VERSION = 1
MAX_BODY = 16 * 1024
MAX_USERNAME = 256
MAX_PASSWORD = 1024

# scrypt defaults: N=2^15, r=8, p=3 is one of OWASP's recommended equivalent settings
# (32 MiB of memory per hash). Parameters are stored per user, so they can be raised later
# without invalidating existing entries.
DEFAULT_N = 2**15
DEFAULT_R = 8
DEFAULT_P = 3
DKLEN = 32
SALT_BYTES = 16
# Bounds accepted when loading users.json (a typo must not make every login take minutes).
MIN_LOG2_N, MAX_LOG2_N = 14, 20
MAX_R, MAX_P = 32, 16

# At most this many password hashes run at once (each holds 128*r*N bytes of memory).
HASH_SLOTS = threading.BoundedSemaphore(4)

# Brute-force throttle: after this many failed logins for one username within the window,
# further attempts get 429 until the window has passed.
FAIL_LIMIT = 10
FAIL_WINDOW_S = 300


def b64e(b):
    return base64.b64encode(b).decode("ascii")


def b64d(s):
    return base64.b64decode(s.encode("ascii"), validate=True)


def scrypt(password, salt, n, r, p, dklen):
    return hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=dklen,
        maxmem=128 * r * (n + p + 2) + 1024 * 1024,
    )


def make_entry(password, n=DEFAULT_N, r=DEFAULT_R, p=DEFAULT_P):
    """A users.json entry: scrypt with a fresh random salt and its parameters."""
    salt = secrets.token_bytes(SALT_BYTES)
    dk = scrypt(password, salt, n, r, p, DKLEN)
    return {"alg": "scrypt", "n": n, "r": r, "p": p, "salt": b64e(salt), "hash": b64e(dk)}


class Users:
    """username -> scrypt entry, loaded from the users file."""

    def __init__(self, path):
        self.path = path
        with open(path, "rb") as f:
            doc = json.load(f)
        if not isinstance(doc, dict) or doc.get("version") != USERS_VERSION:
            raise ValueError(f"{path}: 'version' must be {USERS_VERSION}")
        users = doc.get("users")
        if not isinstance(users, dict):
            raise ValueError(f"{path}: 'users' must be an object of username -> entry")
        self.entries = {}
        for name, e in users.items():
            self.entries[name] = self._check(path, name, e)
        # Unknown usernames are checked against this entry, so they cost the same time as
        # known ones and do not reveal which usernames exist.
        self.dummy = make_entry(secrets.token_urlsafe(16))

    @staticmethod
    def _check(path, name, e):
        where = f"{path}: users[{name!r}]"
        if not name or len(name) > MAX_USERNAME:
            raise ValueError(f"{where}: username must be 1..{MAX_USERNAME} characters")
        if not isinstance(e, dict) or e.get("alg") != "scrypt":
            raise ValueError(f"{where}: 'alg' must be \"scrypt\"")
        n, r, p = e.get("n"), e.get("r"), e.get("p")
        if not (isinstance(n, int) and n > 1 and n & (n - 1) == 0
                and MIN_LOG2_N <= n.bit_length() - 1 <= MAX_LOG2_N):
            raise ValueError(f"{where}: 'n' must be a power of two in 2^{MIN_LOG2_N}..2^{MAX_LOG2_N}")
        if not (isinstance(r, int) and 1 <= r <= MAX_R and isinstance(p, int) and 1 <= p <= MAX_P):
            raise ValueError(f"{where}: 'r' must be 1..{MAX_R} and 'p' 1..{MAX_P}")
        try:
            salt, dk = b64d(e["salt"]), b64d(e["hash"])
        except (KeyError, ValueError, TypeError):
            raise ValueError(f"{where}: 'salt' and 'hash' must be base64") from None
        if len(salt) < 16 or len(dk) < 16:
            raise ValueError(f"{where}: salt and hash must be at least 16 bytes")
        return {"n": n, "r": r, "p": p, "salt": salt, "hash": dk}

    def verify(self, username, password):
        """Constant-time check; the same work is done whether or not the user exists."""
        e = self.entries.get(username)
        known = e is not None
        if not known:
            d = self.dummy
            e = {"n": d["n"], "r": d["r"], "p": d["p"], "salt": b64d(d["salt"]), "hash": b64d(d["hash"])}
        with HASH_SLOTS:
            dk = scrypt(password, e["salt"], e["n"], e["r"], e["p"], len(e["hash"]))
        return hmac.compare_digest(dk, e["hash"]) and known


class Throttle:
    """Failed logins per username in a sliding window."""

    def __init__(self):
        self.lock = threading.Lock()
        self.failures = {}

    def blocked_for(self, username):
        now = time.monotonic()
        with self.lock:
            times = [t for t in self.failures.get(username, []) if now - t < FAIL_WINDOW_S]
            if times:
                self.failures[username] = times
            else:
                self.failures.pop(username, None)
            if len(times) >= FAIL_LIMIT:
                return int(FAIL_WINDOW_S - (now - times[0])) + 1
        return 0

    def failed(self, username):
        with self.lock:
            self.failures.setdefault(username, []).append(time.monotonic())
            if len(self.failures) > 100_000:  # bound memory under a username-spraying attack
                self.failures.clear()

    def succeeded(self, username):
        with self.lock:
            self.failures.pop(username, None)


class Issuer:
    """Client of the sidecar's loopback issuer API (no proxies, short timeouts)."""

    def __init__(self, url):
        u = urllib.parse.urlsplit(url)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"LOGIN_APP_ISSUER_URL must be http://host:port, got {url!r}")
        self.host, self.port = u.hostname, u.port or 80
        self.base = u.path.rstrip("/")

    def call(self, method, path, body=None):
        """Returns (status, parsed JSON body or None)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=5)
        try:
            headers = {"Accept": "application/json"}
            data = None
            if body is not None:
                data = json.dumps(body).encode("utf-8")
                headers["Content-Type"] = "application/json"
            conn.request(method, self.base + path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read(1024 * 1024)
            try:
                return resp.status, json.loads(raw) if raw else None
            except ValueError:
                return resp.status, None
        except OSError as e:
            log(f"issuer API {method} {path}: {e}")
            return 502, {"error": "issuer_unavailable", "error_description": "the sidecar's issuer API is unreachable"}
        finally:
            conn.close()


def log(msg):
    sys.stderr.write(f"login-app: {msg}\n")
    sys.stderr.flush()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    # Set by serve().
    users = None
    issuer = None
    throttle = None
    token_ttl = None

    def version_string(self):
        return "login-app"

    def log_message(self, fmt, *args):  # request line and status only; never bodies
        log(f"{self.address_string()} {fmt % args}")

    def send_json(self, status, obj, extra_headers=()):
        data = json.dumps(obj).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Content-Length", str(len(data)))
        for k, v in extra_headers:
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def error(self, status, code, description, extra_headers=()):
        self.send_json(status, {"error": code, "error_description": description}, extra_headers)

    def read_body(self):
        """The request body, or None (and the connection is closed) when it is missing a
        Content-Length, is too large or badly framed."""
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            n = -1
        if self.headers.get("Transfer-Encoding") or n < 0 or n > MAX_BODY:
            self.close_connection = True
            return None
        return self.rfile.read(n)

    def identity(self):
        """The identity the sidecar established (headers it set after stripping spoofed ones)."""
        return self.headers.get("X-Auth-Subject"), self.headers.get("X-Auth-Jti")

    # -- routes -------------------------------------------------------------------------

    def do_GET(self):
        self.read_body()
        path = urllib.parse.urlsplit(self.path).path
        if path == "/me":
            return self.me()
        self.error(404, "not_found", "no such endpoint")

    def do_POST(self):
        path = urllib.parse.urlsplit(self.path).path
        routes = {"/login": self.login, "/logout": self.logout, "/logout-everywhere": self.logout_everywhere}
        handler = routes.get(path)
        if handler is None:
            self.read_body()
            return self.error(404, "not_found", "no such endpoint")
        handler()

    def login(self):
        body = self.read_body()
        if body is None:
            return self.error(400, "invalid_request", "body missing, too large or badly framed")
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        try:
            if ctype == "application/json":
                doc = json.loads(body.decode("utf-8"))
                username, password = doc.get("username"), doc.get("password")
            elif ctype == "application/x-www-form-urlencoded":
                form = urllib.parse.parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=10)
                username = (form.get("username") or [None])[0]
                password = (form.get("password") or [None])[0]
            else:
                return self.error(415, "invalid_request", "send JSON or an HTML form")
        except (ValueError, UnicodeDecodeError, AttributeError):
            return self.error(400, "invalid_request", "malformed body")
        if not isinstance(username, str) or not isinstance(password, str) \
                or not 0 < len(username) <= MAX_USERNAME or len(password) > MAX_PASSWORD:
            return self.error(400, "invalid_request", "username and password are required")

        wait = self.throttle.blocked_for(username)
        if wait:
            return self.error(429, "too_many_attempts", "too many failed logins; try later",
                              [("Retry-After", str(wait))])
        if not self.users.verify(username, password):
            self.throttle.failed(username)
            log(f"login failed for {username!r}")
            return self.error(401, "invalid_credentials", "wrong username or password")
        self.throttle.succeeded(username)

        mint = {"subject": username}
        if self.token_ttl:
            mint["ttl_seconds"] = self.token_ttl
        status, token = self.issuer.call("POST", "/v1/tokens", mint)
        if status != 201 or not isinstance(token, dict) or "access_token" not in token:
            log(f"mint for {username!r} failed: {status} {token}")
            retry = [("Retry-After", "1")] if status == 503 else []
            return self.error(503 if status in (502, 503) else 502, "token_unavailable",
                              "could not issue a token; retry", retry)
        log(f"login ok for {username!r}: jti {token.get('jti')}, replaced {token.get('replaced_sessions', 0)}")
        self.send_json(200, token)

    def logout(self):
        self.read_body()
        sub, jti = self.identity()
        if not jti:
            return self.error(401, "unauthenticated", "no identity from the sidecar")
        status, out = self.issuer.call("DELETE", "/v1/tokens/" + urllib.parse.quote(jti, safe=""))
        self.relay_revocation(status, out, {"logged_out": True, "subject": sub, "jti": jti})

    def logout_everywhere(self):
        self.read_body()
        sub, _ = self.identity()
        if not sub:
            return self.error(401, "unauthenticated", "no identity from the sidecar")
        status, out = self.issuer.call("DELETE", "/v1/subjects/" + urllib.parse.quote(sub, safe="") + "/tokens")
        self.relay_revocation(status, out, {"logged_out_everywhere": True, "subject": sub})

    def relay_revocation(self, status, out, ok_body):
        out = out if isinstance(out, dict) else {}
        if status == 200:
            ok_body["revoked"] = out.get("revoked")
            ok_body["replicas_confirmed"] = out.get("replicas_confirmed")
            return self.send_json(200, ok_body)
        log(f"revocation failed: {status} {out}")
        # 503 not_replicated: applied on the master but not yet confirmed by a replica.
        self.error(503, "logout_unconfirmed", "logout not confirmed; retry", [("Retry-After", "1")])

    def me(self):
        sub, jti = self.identity()
        if not sub:
            return self.error(401, "unauthenticated", "no identity from the sidecar")
        self.send_json(200, {
            "subject": sub,
            "jti": jti,
            "note": "set by the authrealm sidecar after it validated the token; this app never parses JWTs",
        })


def load_users(path):
    try:
        return Users(path)
    except (OSError, ValueError) as e:
        sys.exit(f"login-app: {e}")


def cmd_serve(args):
    listen = os.environ.get("LOGIN_APP_LISTEN", "127.0.0.1:8080")
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        sys.exit(f"login-app: LOGIN_APP_LISTEN must be host:port, got {listen!r}")
    Handler.users = load_users(args.users)
    try:
        Handler.issuer = Issuer(os.environ.get("LOGIN_APP_ISSUER_URL", "http://127.0.0.1:8444"))
        ttl = os.environ.get("LOGIN_APP_TOKEN_TTL")
        Handler.token_ttl = int(ttl) if ttl else None
    except ValueError as e:
        sys.exit(f"login-app: {e}")
    Handler.throttle = Throttle()
    server = ThreadingHTTPServer((host.strip("[]"), int(port)), Handler)
    server.daemon_threads = True
    log(f"listening on {listen} with {len(Handler.users.entries)} user(s) from {args.users}")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def cmd_hash(args):
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass(f"password for {args.username}: ")
        if getpass.getpass("again: ") != password:
            sys.exit("login-app: passwords differ")
    if not password:
        sys.exit("login-app: empty password")
    n = 2 ** args.log2_n
    entry = make_entry(password, n=n, r=args.r, p=args.p)
    Users._check("(new entry)", args.username, entry)
    if args.print:
        print(json.dumps({args.username: entry}, indent=2))
        return
    try:
        with open(args.users, "rb") as f:
            doc = json.load(f)
    except FileNotFoundError:
        doc = {"version": USERS_VERSION, "users": {}}
    doc.setdefault("users", {})[args.username] = entry
    # Atomic replace, readable by the owner only.
    d = os.path.dirname(os.path.abspath(args.users))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".users-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    os.replace(tmp, args.users)
    print(f"login-app: wrote {args.username} to {args.users}", file=sys.stderr)


def cmd_check(args):
    users = load_users(args.users)
    print(f"ok: {len(users.entries)} user(s) in {args.users}")


def main():
    default_users = os.environ.get("LOGIN_APP_USERS") or os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                        "users.json")
    p = argparse.ArgumentParser(description="Example login app behind an authrealm sidecar")
    p.add_argument("--users", default=default_users, help="users file (default: %(default)s; env LOGIN_APP_USERS)")
    # --users is accepted after the subcommand too.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--users", default=argparse.SUPPRESS, help="users file")
    sub = p.add_subparsers(dest="cmd")
    sub.add_parser("serve", parents=[common], help="serve HTTP (default)")
    h = sub.add_parser("hash", parents=[common], help="add or replace a user in the users file")
    h.add_argument("username")
    h.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    h.add_argument("--print", action="store_true", help="print the entry instead of writing the file")
    h.add_argument("--log2-n", type=int, default=DEFAULT_N.bit_length() - 1, help="scrypt cost: N = 2^this")
    h.add_argument("-r", type=int, default=DEFAULT_R, help="scrypt block size")
    h.add_argument("-p", type=int, default=DEFAULT_P, help="scrypt parallelism")
    sub.add_parser("check", parents=[common], help="validate the users file and exit")
    args = p.parse_args()
    {"hash": cmd_hash, "check": cmd_check}.get(args.cmd, cmd_serve)(args)


if __name__ == "__main__":
    main()
