//! By-target access to the JSON shapes that spell every target as its own
//! `Option<String>` member (`field1`..`field8`, `status`, `latitude`,
//! `longitude`, `elevation`): the subscriber entry and the bulk entry.

/// Implements `get`, `set` and the private `slot_mut` for such a struct.
macro_rules! impl_target_slots {
    ($ty:ty) => {
        impl $ty {
            /// The value of `target`, if present.
            pub fn get(&self, target: $crate::ids::Target) -> Option<&str> {
                use $crate::ids::Target;
                let slot = match target {
                    // Field guarantees 1..=8, so the catch-all arm is field8.
                    Target::Field(f) => match f.get() {
                        1 => &self.field1,
                        2 => &self.field2,
                        3 => &self.field3,
                        4 => &self.field4,
                        5 => &self.field5,
                        6 => &self.field6,
                        7 => &self.field7,
                        _ => &self.field8,
                    },
                    Target::Status => &self.status,
                    Target::Latitude => &self.latitude,
                    Target::Longitude => &self.longitude,
                    Target::Elevation => &self.elevation,
                };
                slot.as_deref()
            }

            /// Sets (or with `None` clears) the value of `target`.
            pub fn set(&mut self, target: $crate::ids::Target, value: Option<String>) {
                *self.slot_mut(target) = value;
            }

            fn slot_mut(&mut self, target: $crate::ids::Target) -> &mut Option<String> {
                use $crate::ids::Target;
                match target {
                    Target::Field(f) => match f.get() {
                        1 => &mut self.field1,
                        2 => &mut self.field2,
                        3 => &mut self.field3,
                        4 => &mut self.field4,
                        5 => &mut self.field5,
                        6 => &mut self.field6,
                        7 => &mut self.field7,
                        _ => &mut self.field8,
                    },
                    Target::Status => &mut self.status,
                    Target::Latitude => &mut self.latitude,
                    Target::Longitude => &mut self.longitude,
                    Target::Elevation => &mut self.elevation,
                }
            }
        }
    };
}

pub(crate) use impl_target_slots;
