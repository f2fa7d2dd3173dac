//! Gathering batches from a queue: the shared step of the leader's proposer and a follower's
//! forwarder.

use tokio::sync::mpsc;

/// Starts a batch with `first` and adds what is already waiting on `rx`: at most `max_items`
/// and at most `max_bytes` by `size`. The first waiting item that would cross the byte bound
/// goes to `carry`, to start the next batch. A batch always holds `first`, whatever its size.
pub fn gather<T>(
    first: T,
    rx: &mut mpsc::Receiver<T>,
    carry: &mut Option<T>,
    max_items: usize,
    max_bytes: usize,
    size: impl Fn(&T) -> usize,
) -> Vec<T> {
    let mut bytes = size(&first);
    let mut batch = vec![first];
    while batch.len() < max_items {
        match rx.try_recv() {
            Ok(item) if bytes + size(&item) > max_bytes => {
                *carry = Some(item);
                break;
            }
            Ok(item) => {
                bytes += size(&item);
                batch.push(item);
            }
            Err(_) => break,
        }
    }
    batch
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn batches_stop_at_the_item_and_byte_bounds_and_carry_the_rest() {
        let (tx, mut rx) = mpsc::channel(16);
        for n in [4, 4, 4, 9, 1] {
            tx.send(n).await.unwrap();
        }
        let mut carry = None;
        let first = rx.recv().await.unwrap();
        let b = gather(first, &mut rx, &mut carry, 10, 12, |n: &usize| *n);
        assert_eq!((b, carry), (vec![4, 4, 4], Some(9)));
        let mut carry = None;
        let b = gather(9, &mut rx, &mut carry, 1, 100, |n: &usize| *n);
        assert_eq!((b, carry), (vec![9], None), "max_items bounds the batch");
        let b = gather(50, &mut rx, &mut carry, 10, 12, |n: &usize| *n);
        assert_eq!(b, vec![50], "an oversized first item still makes a batch");
        assert_eq!(carry, Some(1));
    }
}
