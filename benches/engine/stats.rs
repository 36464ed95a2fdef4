//! Medians and quartiles of measured values.

use serde::Serialize;

/// The median and quartiles of some values (the values at n/4, n/2 and 3n/4 once sorted).
#[derive(Serialize, Debug, Clone, Copy, Default)]
pub struct Spread {
    pub median: f64,
    pub q1: f64,
    pub q3: f64,
}

impl Spread {
    pub fn of(values: &mut [f64]) -> Spread {
        values.sort_by(f64::total_cmp);
        let n = values.len();
        Spread { median: values[n / 2], q1: values[n / 4], q3: values[(3 * n) / 4] }
    }
}

pub fn median(values: &mut [f64]) -> f64 {
    Spread::of(values).median
}
