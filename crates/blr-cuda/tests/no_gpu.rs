//! The runtime must never panic when CUDA is missing (cudarc panics on a missing library if
//! called blindly): on a machine without a driver, opening a GPU returns a typed error that
//! says what is missing; on a machine with one, it opens. Either way, no panic.

use blr_cuda::{Error, Gpu, GpuOptions};

#[test]
fn opening_a_gpu_never_panics_and_explains_failure() {
    let report = blr_cuda::libs::report();
    match Gpu::new(GpuOptions::default()) {
        Ok(gpu) => {
            assert!(
                report.driver,
                "a Gpu opened but the driver was reported missing"
            );
            assert!(gpu.info().sm_count > 0);
        }
        Err(e @ Error::DriverNotFound) => {
            assert!(!report.driver);
            let msg = e.to_string();
            assert!(msg.contains("libcuda") && msg.contains("CPU"), "{msg}");
        }
        Err(e @ (Error::NoDevice | Error::UnsupportedDevice { .. })) => {
            assert!(!e.to_string().is_empty());
        }
        Err(other) => panic!("unexpected error opening the default GPU: {other}"),
    }
}

#[test]
fn device_out_of_range_is_an_error_not_a_panic() {
    let opts = GpuOptions {
        ordinal: 1000,
        ..GpuOptions::default()
    };
    match Gpu::new(opts) {
        Err(Error::DeviceOutOfRange { ordinal, .. }) => assert_eq!(ordinal, 1000),
        Err(Error::DriverNotFound | Error::NoDevice) => {}
        Err(other) => panic!("unexpected error: {other}"),
        Ok(_) => panic!("device 1000 opened"),
    }
}
