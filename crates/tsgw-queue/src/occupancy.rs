//! In-memory counts of what the store holds, so `len`, `bytes` and `channels`
//! never scan the store (sled's own `len()` walks the whole tree).

use std::collections::BTreeMap;

use tsgw_core::ChannelId;

/// Readings and bytes of one channel, or of the whole queue.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Occupancy {
    pub readings: u64,
    /// Encoded key + value bytes.
    pub bytes: u64,
}

/// Per-channel and total occupancy. Only channels with readings are listed.
#[derive(Debug, Default, Clone)]
pub struct Counts {
    per_channel: BTreeMap<ChannelId, Occupancy>,
    total: Occupancy,
}

impl Counts {
    pub fn add(&mut self, channel: ChannelId, bytes: u64) {
        let c = self.per_channel.entry(channel).or_default();
        c.readings += 1;
        c.bytes += bytes;
        self.total.readings += 1;
        self.total.bytes += bytes;
    }

    /// Saturating, so a bookkeeping slip can never wrap the gauges to 2^64.
    pub fn sub(&mut self, channel: ChannelId, bytes: u64) {
        if let Some(c) = self.per_channel.get_mut(&channel) {
            c.readings = c.readings.saturating_sub(1);
            c.bytes = c.bytes.saturating_sub(bytes);
            if c.readings == 0 {
                self.per_channel.remove(&channel);
            }
        }
        self.total.readings = self.total.readings.saturating_sub(1);
        self.total.bytes = self.total.bytes.saturating_sub(bytes);
    }

    pub fn total(&self) -> Occupancy {
        self.total
    }

    /// Channels with readings, ascending.
    pub fn channels(&self) -> Vec<ChannelId> {
        self.per_channel.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_disappear_when_emptied() {
        let a = ChannelId::new(2).unwrap();
        let b = ChannelId::new(1).unwrap();
        let mut c = Counts::default();
        c.add(a, 40);
        c.add(b, 30);
        c.add(a, 40);
        assert_eq!(c.channels(), vec![b, a]);
        assert_eq!(
            c.total(),
            Occupancy {
                readings: 3,
                bytes: 110
            }
        );
        c.sub(b, 30);
        assert_eq!(c.channels(), vec![a]);
        c.sub(a, 40);
        c.sub(a, 40);
        c.sub(a, 40);
        assert_eq!(c.total(), Occupancy::default());
        assert!(c.channels().is_empty());
    }
}
