//! One link connection's byte stream, which says when it is gone: the relay
//! drops an agent, and an agent redials, the moment HTTP/2 lets go of the
//! connection (closed by the peer, or dead by keepalive).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;

/// HTTP/2 pings on an idle link, and how long a ping may go unanswered
/// before the link counts as dead: a node that vanished without closing its
/// connection (power, network) is dropped within their sum.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(3);

/// A stream that fires its `closed` receiver when dropped.
pub struct LinkIo<S> {
    inner: S,
    _closed: oneshot::Sender<()>,
}

impl<S> LinkIo<S> {
    pub fn new(inner: S) -> (LinkIo<S>, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        (LinkIo { inner, _closed: tx }, rx)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for LinkIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for LinkIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<S> tonic::transport::server::Connected for LinkIo<S> {
    type ConnectInfo = ();
    fn connect_info(&self) {}
}
