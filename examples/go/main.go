// A Go net/http server that speaks herd's whole worker contract with the
// standard library only: the inherited socket (fd 3) or $PORT, READY=1 over
// sd_notify, and a stop on SIGTERM that fails no keep-alive client.
//
// http.Server.Shutdown alone closes idle keep-alive connections at once, and
// in herd's fd modes a client may be sending its next request on one right
// then: it gets a reset. So on SIGTERM this server stops accepting, answers
// each connection's next request with `Connection: close`, and calls
// Shutdown (idle connections closed, requests in flight finished) only
// after a grace, as HAProxy's soft stop does.
//
//	go build -o hello examples/go/main.go
//	herd run -i 2 --mode shared -- ./hello
package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"
	"time"
)

func main() {
	ln, err := listener()
	if err != nil {
		fmt.Fprintln(os.Stderr, "listen:", err)
		os.Exit(1)
	}
	var stopping atomic.Bool
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if stopping.Load() {
			// net/http closes the connection after this answer.
			w.Header().Set("Connection", "close")
		}
		fmt.Fprintf(w, "hello from go worker %s (pid %d)\n", os.Getenv("HERD_WORKER_ID"), os.Getpid())
	})}
	// herd's proxy stops sending to a worker before it stops it; clients of
	// the fd modes may be sending on an idle connection right now.
	grace := time.Second
	if os.Getenv("HERD_MODE") == "proxy" {
		grace = 0
	}
	stopped := make(chan struct{})
	go func() {
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
		<-sig
		stopping.Store(true)
		ln.Close() // stop accepting; the other workers take new clients
		time.Sleep(grace)
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
		close(stopped)
	}()
	notify("READY=1")
	err = srv.Serve(ln)
	if err != nil && !errors.Is(err, net.ErrClosed) && !errors.Is(err, http.ErrServerClosed) {
		fmt.Fprintln(os.Stderr, "serve:", err)
		os.Exit(1)
	}
	<-stopped
}

// listener takes herd's socket in the fd modes (shared, reuseport: fd 3, as
// systemd's socket activation passes it) and binds $PORT in proxy mode.
func listener() (net.Listener, error) {
	if os.Getenv("LISTEN_FDS") == "1" {
		return net.FileListener(os.NewFile(3, "herd"))
	}
	port := os.Getenv("PORT")
	if port == "" {
		port = "3000"
	}
	return net.Listen("tcp", ":"+port)
}

// notify sends an sd_notify state to herd (or systemd); Go reads a leading
// '@' as Linux's abstract namespace.
func notify(state string) {
	path := os.Getenv("NOTIFY_SOCKET")
	if path == "" {
		return
	}
	conn, err := net.Dial("unixgram", path)
	if err != nil {
		return
	}
	defer conn.Close()
	conn.Write([]byte(state))
}
