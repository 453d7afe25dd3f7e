//! The receive budget on real request bodies: framing across chunk
//! boundaries, unary refusal, streams held back until a charge is settled.

use std::collections::VecDeque;
use std::time::Duration;

use futures_util::future::poll_fn;

use super::*;

/// A request body that yields the given chunks.
struct Chunks(VecDeque<Bytes>);

impl Body for Chunks {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
    }
}

/// `len` bytes of one gRPC message, prefix included.
fn message(len: usize) -> Vec<u8> {
    let mut m = vec![0u8];
    m.extend_from_slice(&(len as u32).to_be_bytes());
    m.extend(std::iter::repeat_n(7u8, len));
    m
}

/// `bytes` cut into chunks of `size`.
fn chunked(bytes: &[u8], size: usize) -> VecDeque<Bytes> {
    bytes.chunks(size).map(Bytes::copy_from_slice).collect()
}

fn charged(budget: &Receiving, chunks: VecDeque<Bytes>, waits: bool) -> (Charged, Receipts) {
    let receipts = Receipts::default();
    let body = Charged {
        inner: tonic::body::Body::new(Chunks(chunks)),
        budget: budget.clone(),
        receipts: receipts.clone(),
        waits,
        prefix: Prefix::default(),
        held: None,
        waiting: None,
        refused: None,
    };
    (body, receipts)
}

async fn next(body: &mut Charged) -> Option<Result<Bytes, tonic::Status>> {
    poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx))
        .await
        .map(|r| r.map(|f| f.into_data().unwrap_or_default()))
}

/// Everything `body` yields, concatenated.
async fn drain(body: &mut Charged) -> Result<Vec<u8>, tonic::Status> {
    let mut all = Vec::new();
    while let Some(data) = next(body).await {
        all.extend_from_slice(&data?);
    }
    Ok(all)
}

#[test]
fn prefixes_are_found_wherever_the_chunks_cut_them() {
    let stream: Vec<u8> = [message(3), message(0), message(300)].concat();
    for size in [1, 2, 4, 5, 6, 9, 64, 1000] {
        let mut prefix = Prefix::default();
        let mut lengths = Vec::new();
        for chunk in stream.chunks(size) {
            let mut rest = chunk;
            while let Some((split, len)) = prefix.scan(rest) {
                lengths.push(len);
                rest = &rest[split..];
            }
        }
        assert_eq!(lengths, [3, 0, 300], "chunks of {size}");
    }
}

#[tokio::test]
async fn a_unary_message_that_does_not_fit_is_refused_as_its_prefix_arrives() {
    let budget = Receiving::new(10_000);
    let (mut first, first_receipts) = charged(&budget, chunked(&message(6000), 700), false);
    assert_eq!(drain(&mut first).await.unwrap(), message(6000));
    assert_eq!(budget.held(), 6000 + OVERHEAD, "charged until settled");

    let (mut second, _) = charged(&budget, chunked(&message(6000), 700), false);
    let refused = drain(&mut second).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    assert!(refused.message().contains("receive budget"), "{refused:?}");

    first_receipts.settle();
    assert_eq!(budget.held(), 0);
    let (mut third, third_receipts) = charged(&budget, chunked(&message(6000), 700), false);
    assert_eq!(drain(&mut third).await.unwrap(), message(6000));
    drop(third_receipts);
    drop(third);
    assert_eq!(budget.held(), 0, "a call's charges go when it ends");
}

#[tokio::test]
async fn a_stream_is_not_read_past_a_message_that_does_not_fit_until_room_is_made() {
    let budget = Receiving::new(10_000);
    let stream = [message(6000), message(6000)].concat();
    let (mut body, receipts) = charged(&budget, chunked(&stream, 1000), true);
    // The first message passes whole; of the second only its prefix.
    let mut got = Vec::new();
    while got.len() < 6005 + 5 {
        got.extend_from_slice(&next(&mut body).await.unwrap().unwrap());
    }
    assert_eq!(got, stream[..6010]);
    let blocked = tokio::time::timeout(Duration::from_millis(100), next(&mut body)).await;
    assert!(blocked.is_err(), "held back while the budget is full");
    // The handler admits the first message's frames and settles it.
    receipts.settle();
    got.extend_from_slice(&drain(&mut body).await.unwrap());
    assert_eq!(got, stream);
    assert_eq!(budget.held(), 6000 + OVERHEAD);
}

#[tokio::test]
async fn a_message_larger_than_the_whole_budget_still_gets_through_alone() {
    let budget = Receiving::new(1000);
    let (mut body, _receipts) = charged(&budget, chunked(&message(5000), 512), false);
    assert_eq!(drain(&mut body).await.unwrap(), message(5000));
    assert_eq!(budget.held(), 1000);
}
