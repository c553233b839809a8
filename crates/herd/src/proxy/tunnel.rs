//! A byte relay between two sockets that holds no buffer while idle: for
//! `--protocol tcp` connections and HTTP upgrades (WebSocket). Each way
//! waits for readability with nothing allocated, then borrows one of the
//! thread's buffers (`conns`) for a read and the writes that pass it on.
//! `tokio::io::copy_bidirectional` keeps two 8 KiB buffers for the life of
//! the connection: 16 KiB per idle WebSocket or TCP client.

use std::future::Future;
use std::io;
use std::pin::pin;
use std::task::Poll;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::backend::Conn;
use super::conns;

/// Bytes read at a time; the thread's HTTP buffers are larger and serve.
const CHUNK: usize = 16 * 1024;

/// Relays both ways until each side has ended its writing; an end of file
/// one way shuts down writing the other way (half-close), as
/// `copy_bidirectional` does. Returns the bytes moved `a → b` and `b → a`.
pub async fn relay(a: &mut TcpStream, b: &mut TcpStream) -> io::Result<(u64, u64)> {
    let (ar, aw) = a.split();
    let (br, bw) = b.split();
    tokio::try_join!(one_way(ar, bw), one_way(br, aw))
}

/// [`relay`] from a client to a backend connection of either kind.
pub async fn relay_to(a: &mut TcpStream, b: &mut Conn) -> io::Result<(u64, u64)> {
    match b {
        Conn::Tcp(b) => relay(a, b).await,
        Conn::Unix(b) => {
            let (ar, aw) = a.split();
            let (br, bw) = b.split();
            tokio::try_join!(one_way(ar, bw), one_way(br, aw))
        }
    }
}

/// [`relay`] for any two streams (hyper's upgraded connections, TLS ones
/// among them): each is split behind tokio's lock, which [`relay`] avoids.
pub async fn relay_io<A, B>(a: A, b: B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite,
    B: AsyncRead + AsyncWrite,
{
    let (ar, aw) = tokio::io::split(a);
    let (br, bw) = tokio::io::split(b);
    tokio::try_join!(one_way(ar, bw), one_way(br, aw))
}

async fn one_way<R, W>(mut from: R, mut to: W) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut moved = 0;
    loop {
        // Each poll borrows a buffer and gives it back unless bytes came:
        // waiting holds none. (tokio's `poll_read` also marks the socket
        // drained after a short read, so no read ends in EAGAIN.)
        let mut got = None;
        let n = std::future::poll_fn(|cx| {
            let mut buf = conns::buffer(CHUNK);
            let polled = pin!(from.read_buf(&mut buf)).poll(cx);
            match polled {
                Poll::Ready(Ok(n)) if n > 0 => {
                    got = Some(buf);
                    Poll::Ready(Ok(n))
                }
                other => {
                    conns::give_back(buf);
                    other
                }
            }
        })
        .await?;
        let Some(buf) = got else {
            // The peer may have gone already: nothing more to tell it.
            let _ = to.shutdown().await;
            return Ok(moved);
        };
        // Back-pressure: the buffer is held only while `to` is full.
        to.write_all(&buf[..n]).await?;
        moved += n as u64;
        conns::give_back(buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        (c, l.accept().await.unwrap().0)
    }

    #[tokio::test]
    async fn relays_both_ways_with_back_pressure_and_half_close() {
        relays_both_ways(false).await;
        relays_both_ways(true).await;
    }

    async fn relays_both_ways(generic: bool) {
        // client <-> (a relay b) <-> server
        let (mut client, a) = pair().await;
        let (b, mut server) = pair().await;
        let relay = tokio::spawn(async move {
            let (mut a, mut b) = (a, b);
            if generic {
                relay_io(a, b).await
            } else {
                relay(&mut a, &mut b).await
            }
        });
        // More than the socket buffers hold, so writes meet back-pressure.
        let big: Vec<u8> = (0..8 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
        let sent = big.clone();
        let up = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap(); // half-close
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert!(got == big, "the server got {} bytes", got.len());
        // The other way still flows after the client's half-close.
        server.write_all(b"answer").await.unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(up.await.unwrap(), b"answer");
        let (to_b, to_a) = relay.await.unwrap().unwrap();
        assert_eq!((to_b, to_a), (big.len() as u64, 6));
    }
}
