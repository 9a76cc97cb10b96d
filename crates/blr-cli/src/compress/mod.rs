//! Whole-model compression: which layers become what (the plan) and calibration.

pub mod calibrate;
pub mod device;
pub mod plan;
pub mod sensitivity;
pub mod sequential;
pub mod weights;
