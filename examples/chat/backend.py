#!/usr/bin/env python3
"""The chat example's backend: the page, the log-in, and gale's proxy
endpoints, with Python's standard library alone.

    python3 examples/chat/backend.py [--port 8000] [--gale-url ws://HOST:8080/ws]

What it serves:

  GET  /               the page (index.html, chat.js, chat.css)
  GET  /session        who the browser is: {"user", "name", "color", "gale"}
  POST /login          name=alice: a session, in an HttpOnly cookie
  POST /logout         ends it

and, for gale alone (each call must carry the X-Gale-Secret header that
gale.toml's [proxy] static_headers sends):

  POST /gale/connect   who a WebSocket is, from the session cookie gale
                       forwards ([proxy] headers = ["Cookie"])
  POST /gale/subscribe who may join room:NAME
  POST /gale/publish   what is said in a room (checked, stamped, kept for
                       search), and knocks on another's inbox
  POST /gale/rpc       chat.search, chat.conversations
  POST /gale/events    user.online / user.offline

Each gale call is a JSON POST answered with {"result": {...}} or
{"error": {"code", "message"}}: see docs and src/proxy.rs.

Everything is kept in memory: a restart logs everyone out and forgets
what search knew (gale keeps the rooms' history itself).
"""

import argparse
import hashlib
import hmac
import json
import os
import re
import secrets
import sys
import threading
import time
from collections import deque
from http import cookies
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

HERE = os.path.dirname(os.path.abspath(__file__))

COOKIE = "chat_session"
SESSION_S = 12 * 3600
# User ids go into topic names (dm:#alice,bob, inbox:#alice): no commas,
# no #, short.
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,24}$")
ROOM_RE = re.compile(r"^room:[a-z0-9][a-z0-9-]{0,31}$")
ROOMS = ["general", "random", "help"]
MAX_TEXT = 500
MAX_KEPT = 10_000
COLORS = ["#c0392b", "#2471a3", "#1e8449", "#b9770e", "#7d3c98", "#138d75", "#a04000", "#2e4053"]

STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/chat.js": ("chat.js", "text/javascript; charset=utf-8"),
    "/chat.css": ("chat.css", "text/css; charset=utf-8"),
}


def now_ms():
    return int(time.time() * 1000)


def color_of(user):
    return COLORS[hashlib.sha256(user.encode()).digest()[0] % len(COLORS)]


def dm_topic(a, b):
    """The direct-message topic of two users: dm:# and their ids, sorted."""
    return "dm:#" + ",".join(sorted([a, b]))


class Chat:
    """The backend's state: sessions, the messages it saw, who is online,
    and who has DMs with whom. One lock; every operation is short."""

    def __init__(self):
        self.lock = threading.Lock()
        self.sessions = {}  # token -> {"user", "name", "color", "expires"}
        self.messages = deque(maxlen=MAX_KEPT)  # {"room", "user", "name", "text", "at"}
        self.online = set()
        self.conversations = {}  # user -> {dm topic: the other user}

    def login(self, name):
        token = secrets.token_urlsafe(32)
        user = name.lower()
        s = {"user": user, "name": name, "color": color_of(user), "expires": time.time() + SESSION_S}
        with self.lock:
            self.sessions[token] = s
        return token, s

    def session(self, token):
        if not token:
            return None
        with self.lock:
            s = self.sessions.get(token)
            if s and s["expires"] < time.time():
                del self.sessions[token]
                s = None
            return s

    def logout(self, token):
        with self.lock:
            self.sessions.pop(token, None)

    def said(self, room, user, name, text, at):
        with self.lock:
            self.messages.append({"room": room, "user": user, "name": name, "text": text, "at": at})

    def search(self, q, room=None, limit=20):
        q = q.casefold()
        with self.lock:
            found = []
            for m in reversed(self.messages):
                if (room is None or m["room"] == room) and q in m["text"].casefold():
                    found.append(dict(m))
                    if len(found) == limit:
                        break
        return found

    def knocked(self, a, b):
        topic = dm_topic(a, b)
        with self.lock:
            self.conversations.setdefault(a, {})[topic] = b
            self.conversations.setdefault(b, {})[topic] = a
        return topic

    def conversations_of(self, user):
        with self.lock:
            return [{"topic": t, "with": other} for t, other in self.conversations.get(user, {}).items()]


def session_token(cookie_header):
    if not cookie_header:
        return None
    jar = cookies.SimpleCookie()
    try:
        jar.load(cookie_header)
    except cookies.CookieError:
        return None
    morsel = jar.get(COOKIE)
    return morsel.value if morsel else None


def error(code, message):
    return {"error": {"code": code, "message": message}}


# --- gale's calls: body in, answer out --------------------------------------


def on_connect(chat, body):
    """Who this connection is: the session's user, with public info that
    presence and topic.join show, subscribed at once to its own inbox. No
    session: an anonymous connection, which may join no room (subscribe
    below refuses it) and no DM (gale refuses: dm:#… lists users)."""
    token = session_token((body.get("headers") or {}).get("cookie"))
    s = chat.session(token)
    if not s:
        return {"result": {}}
    return {
        "result": {
            "user": s["user"],
            "info": {"name": s["name"], "color": s["color"]},
            "topics": ["inbox:#" + s["user"]],
        }
    }


def on_subscribe(chat, body):
    topic, user = body.get("topic", ""), body.get("user")
    if not topic.startswith("room:"):
        return error("not_allowed", f"{topic} is not a room")
    if not user:
        return error("login_required", "log in to join rooms")
    if not ROOM_RE.match(topic):
        return error("bad_room", "a room's name is 1 to 32 lower-case letters, digits or dashes")
    return {"result": {}}


def clean_text(data):
    """The message's text, trimmed and without control characters, or an
    error answer."""
    text = data.get("text") if isinstance(data, dict) else None
    if not isinstance(text, str):
        return None, error("bad_message", 'send {"text": "…"}')
    text = "".join(c for c in text if c >= " " and c != "\x7f").strip()
    if not text:
        return None, error("empty", "say something")
    if len(text) > MAX_TEXT:
        return None, error("too_long", f"at most {MAX_TEXT} characters")
    return text, None


def on_publish(chat, body, names):
    topic, user, data = body.get("topic", ""), body.get("user"), body.get("data")
    if not user:
        return error("login_required", "log in to chat")
    name, color = names(user)
    if topic.startswith("room:"):
        text, refused = clean_text(data)
        if refused:
            return refused
        at = now_ms()
        chat.said(topic, user, name, text, at)
        # What gale publishes instead of what the page sent. The push
        # carries the publisher's user too; the author is repeated here,
        # with the name and colour, so a message stands on its own (in
        # history, in search).
        return {"result": {"data": {"text": text, "user": user, "name": name, "color": color, "at": at}}}
    if topic.startswith("inbox:#"):
        to = topic[len("inbox:#"):]
        dm = data.get("dm") if isinstance(data, dict) else None
        if to == user or not NAME_RE.match(to) or dm != dm_topic(user, to):
            return error("bad_knock", f'knock on another user\'s inbox with {{"dm": "{dm_topic(user, to)}"}}')
        chat.knocked(user, to)
        return {"result": {"data": {"dm": dm, "from": user, "name": name, "color": color}}}
    return error("not_allowed", f"{topic} takes no publications")


def on_rpc(chat, body, names):
    user, event, data = body.get("user"), body.get("event"), body.get("data")
    if not user:
        return error("login_required", "log in first")
    if event == "chat.search":
        q = data.get("q") if isinstance(data, dict) else None
        room = data.get("room") if isinstance(data, dict) else None
        if not isinstance(q, str) or not (1 <= len(q.strip()) <= 100):
            return error("bad_query", 'search with {"q": "1 to 100 characters"}')
        if room is not None and not (isinstance(room, str) and ROOM_RE.match(room)):
            return error("bad_room", "room must be a room:NAME")
        return {"result": {"q": q.strip(), "matches": chat.search(q.strip(), room)}}
    if event == "chat.conversations":
        out = []
        for c in chat.conversations_of(user):
            name, color = names(c["with"])
            out.append({**c, "name": name, "color": color})
        return {"result": {"conversations": out}}
    return error("unknown_event", f"the backend answers no {event}")


def on_events(chat, body, log):
    for e in body.get("events") or []:
        kind, user = e.get("type"), e.get("user")
        with chat.lock:
            if kind == "user.online":
                chat.online.add(user)
            elif kind == "user.offline":
                chat.online.discard(user)
            online = sorted(chat.online)
        log(f"{kind}: {user} (online now: {', '.join(online) or 'nobody'})")
    return {"result": {}}


# --- HTTP -------------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    server_version = "chat-example/1"
    protocol_version = "HTTP/1.1"  # keep-alive: gale reuses its connections

    # Set by main().
    chat = None
    secret = ""
    gale_url = None
    gale_port = 8080
    quiet = False

    def log_message(self, fmt, *args):
        if not self.quiet:
            sys.stderr.write("backend: " + (fmt % args) + "\n")

    def say(self, text):
        sys.stderr.write(f"backend: {text}\n")

    def names(self, user):
        """The display name and colour of a user id (from any of their
        sessions; else the id itself)."""
        with self.chat.lock:
            for s in self.chat.sessions.values():
                if s["user"] == user:
                    return s["name"], s["color"]
        return user, color_of(user)

    # Responses.

    def send(self, status, body=b"", ctype="application/json", headers=()):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_json(self, status, obj, headers=()):
        self.send(status, json.dumps(obj).encode(), "application/json", headers)

    def read_body(self):
        n = int(self.headers.get("Content-Length") or 0)
        if n > 1 << 20:
            raise ValueError("body too large")
        return self.rfile.read(n) if n else b""

    # Routes.

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path in STATIC:
            file, ctype = STATIC[path]
            with open(os.path.join(HERE, file), "rb") as f:
                self.send(200, f.read(), ctype)
        elif path == "/session":
            s = self.chat.session(session_token(self.headers.get("Cookie")))
            me = {"user": s["user"], "name": s["name"], "color": s["color"]} if s else {"user": None}
            self.send_json(200, {**me, "gale": self.gale_url, "galePort": self.gale_port, "rooms": ROOMS})
        elif path == "/healthz":
            self.send(200, b"ok\n", "text/plain")
        else:
            self.send(404, b"not found\n", "text/plain")

    do_HEAD = do_GET

    def do_POST(self):
        path = self.path.split("?", 1)[0]
        try:
            raw = self.read_body()
        except ValueError:
            self.send(413, b"too large\n", "text/plain")
            return
        if path.startswith("/gale/"):
            self.gale_call(path[len("/gale/"):], raw)
        elif path == "/login":
            self.login(raw)
        elif path == "/logout":
            self.chat.logout(session_token(self.headers.get("Cookie")))
            self.send(303, b"", "text/plain", [("Location", "/"), ("Set-Cookie", f"{COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax")])
        else:
            self.send(404, b"not found\n", "text/plain")

    def login(self, raw):
        form = self.headers.get("Content-Type", "").startswith("application/x-www-form-urlencoded")
        try:
            name = parse_qs(raw.decode())["name"][0].strip() if form else json.loads(raw or b"{}").get("name", "").strip()
        except (KeyError, ValueError, AttributeError, UnicodeDecodeError):
            name = ""
        if not NAME_RE.match(name):
            message = "a name is 1 to 24 letters, digits, _ or -"
            if form:
                self.send(303, b"", "text/plain", [("Location", "/?error=name")])
            else:
                self.send_json(400, error("bad_name", message))
            return
        token, s = self.chat.login(name)
        # The page and gale share the host (cookies ignore ports), so the
        # browser sends this cookie with the WebSocket handshake to gale
        # too; gale forwards it to /gale/connect. HttpOnly: no script
        # reads it. SameSite=Lax: other sites' pages do not send it.
        cookie = f"{COOKIE}={token}; Path=/; Max-Age={SESSION_S}; HttpOnly; SameSite=Lax"
        self.say(f"login: {s['user']}")
        if form:
            self.send(303, b"", "text/plain", [("Location", "/"), ("Set-Cookie", cookie)])
        else:
            self.send_json(200, {"user": s["user"], "name": s["name"], "color": s["color"]}, [("Set-Cookie", cookie)])

    def gale_call(self, kind, raw):
        # Only gale knows the secret ([proxy] static_headers): a browser
        # (or anyone else) calling these endpoints is refused.
        given = self.headers.get("X-Gale-Secret", "")
        if not hmac.compare_digest(given.encode(), self.secret.encode()):
            self.send_json(403, error("forbidden", "not gale"))
            return
        try:
            body = json.loads(raw or b"{}")
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except ValueError:
            self.send_json(400, error("bad_request", "a JSON object, please"))
            return
        if kind == "connect":
            answer = on_connect(self.chat, body)
        elif kind == "subscribe":
            answer = on_subscribe(self.chat, body)
        elif kind == "publish":
            answer = on_publish(self.chat, body, self.names)
        elif kind == "rpc":
            answer = on_rpc(self.chat, body, self.names)
        elif kind == "events":
            answer = on_events(self.chat, body, self.say)
        else:
            self.send(404, b"not found\n", "text/plain")
            return
        if "error" in answer and not self.quiet:
            self.say(f"{kind} refused for {body.get('user')}: {answer['error']['code']} ({body.get('topic') or body.get('event') or ''})")
        self.send_json(200, answer)


def main():
    p = argparse.ArgumentParser(description="The chat example's backend (examples/chat/README.md).")
    p.add_argument("--host", default=os.environ.get("CHAT_HOST", "127.0.0.1"), help="address to listen on (default 127.0.0.1, env CHAT_HOST)")
    p.add_argument("--port", type=int, default=int(os.environ.get("CHAT_PORT", "8000")), help="port (default 8000, env CHAT_PORT; 0: any free one)")
    p.add_argument("--gale-url", default=os.environ.get("CHAT_GALE_URL"), help="gale's WebSocket URL as the browser reaches it (default: ws://<the page's host>:<--gale-port>/ws; env CHAT_GALE_URL)")
    p.add_argument("--gale-port", type=int, default=int(os.environ.get("CHAT_GALE_PORT", "8080")), help="gale's port, when --gale-url is not given (default 8080, env CHAT_GALE_PORT)")
    p.add_argument("--secret", default=os.environ.get("CHAT_GALE_SECRET", "chat-example-secret-change-me"), help="what gale sends as X-Gale-Secret (env CHAT_GALE_SECRET; default: gale.toml's)")
    p.add_argument("--quiet", action="store_true", help="log no requests")
    args = p.parse_args()

    Handler.chat = Chat()
    Handler.secret = args.secret
    Handler.gale_url = args.gale_url
    Handler.gale_port = args.gale_port
    Handler.quiet = args.quiet
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    host, port = server.server_address[:2]
    # Tests read the port from this line.
    sys.stderr.write(f"chat backend at http://{host}:{port}/\n")
    sys.stderr.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
