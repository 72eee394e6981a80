// Socket.IO 4 on Node, as its documentation sets a server up
// (https://socket.io/docs/v4/server-initialization/) with the tips of
// https://socket.io/docs/v4/performance-tuning/ (the bufferutil and
// utf-8-validate add-ons, installed beside it, which ws picks up; the
// first HTTP request of each connection discarded). Every client joins
// the room "bench"; POST /publish emits the body (JSON) to the room as
// the event "bench". io.to().emit() encodes the packet once and writes
// it to every socket of the room before the HTTP answer goes out (Node
// is single-threaded: the fan-out is done when the emit returns).
//
//   PORT=9200 NODE_ENV=production node server.js
"use strict";

const http = require("node:http");
const { Server } = require("socket.io");

const port = Number(process.env.PORT || 9200);
const host = process.env.HOST || "127.0.0.1";

const httpServer = http.createServer((req, res) => {
  if (req.method !== "POST" || req.url !== "/publish") {
    res.writeHead(404).end();
    return;
  }
  const chunks = [];
  req.on("data", (c) => chunks.push(c));
  req.on("end", () => {
    let data;
    try {
      data = JSON.parse(Buffer.concat(chunks).toString());
    } catch {
      res.writeHead(400).end();
      return;
    }
    io.to("bench").emit("bench", data);
    res.writeHead(204).end();
  });
});

const io = new Server(httpServer, { serveClient: false });

// Performance tuning: "Discard the initial HTTP request".
io.engine.on("connection", (rawSocket) => {
  rawSocket.request = null;
});

io.on("connection", (socket) => {
  socket.join("bench");
});

httpServer.listen(port, host, () => {
  console.error(`socket.io on ws://${host}:${port}/socket.io/, POST http://${host}:${port}/publish`);
});
