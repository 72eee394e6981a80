// The gorilla/websocket chat example's main (examples/chat/main.go) with
// the page it serves replaced by POST /publish: the request body goes to
// the hub's broadcast channel, as a chat message from a client would.
// The answer is sent once the hub has taken the message, before it has
// been queued on any connection.
//
//	gorilla-hub -addr 127.0.0.1:9300
package main

import (
	"flag"
	"io"
	"log"
	"net/http"
)

var addr = flag.String("addr", "127.0.0.1:9300", "http service address")

func main() {
	flag.Parse()
	hub := newHub()
	go hub.run()
	http.HandleFunc("/publish", func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost {
			http.Error(w, "Method not allowed", http.StatusMethodNotAllowed)
			return
		}
		body, err := io.ReadAll(r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		hub.broadcast <- body
		w.WriteHeader(http.StatusNoContent)
	})
	http.HandleFunc("/ws", func(w http.ResponseWriter, r *http.Request) {
		serveWs(hub, w, r)
	})
	log.Printf("gorilla hub on ws://%s/ws, POST http://%s/publish", *addr, *addr)
	err := http.ListenAndServe(*addr, nil)
	if err != nil {
		log.Fatal("ListenAndServe: ", err)
	}
}
