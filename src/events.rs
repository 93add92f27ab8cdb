//! Placeholder, replaced by the events module.
