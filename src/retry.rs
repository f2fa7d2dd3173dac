//! The one retry pacing: exponential backoff between a first and a largest pause. Every loop
//! that retries also bounds its attempts or its time; this only spaces them.

use std::time::Duration;

/// Doubling pauses from `first` up to `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    first: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            next: first,
            first,
            max,
        }
    }

    /// The pause `next_pause` would give, without taking it (to see whether it still fits a
    /// deadline).
    pub fn peek(&self) -> Duration {
        self.next
    }

    /// The pause to take now; the next one doubles, up to `max`.
    pub fn next_pause(&mut self) -> Duration {
        let pause = self.next;
        self.next = (self.next * 2).min(self.max);
        pause
    }

    /// Sleeps for the next pause.
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next_pause()).await;
    }

    /// Back to the first pause, after a success.
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_up_to_the_largest_and_reset() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(10), ms(35));
        let got: Vec<_> = (0..4).map(|_| b.next_pause()).collect();
        assert_eq!(got, [ms(10), ms(20), ms(35), ms(35)]);
        assert_eq!(b.peek(), ms(35));
        b.reset();
        assert_eq!(b.next_pause(), ms(10));
    }
}
