//! Launches through `cuLaunchKernelEx` for what cudarc's launch builder ([`crate::gpu::Launch`])
//! cannot express: one launch attribute (a thread-block cluster, programmatic dependent launch,
//! or a cooperative grid), and the cluster occupancy query that takes the same configuration.
//! Used by the fused BLAST kernel (clusters) and the decode kernel (PDL or cooperative).
//!
//! The one `unsafe` part is [`launch_ex`]: the argument list must match the kernel's C
//! signature, which nothing here can check. Parameter packing, the `CUlaunchConfig`, the
//! context bind and the error mapping are done once, here.

use std::ffi::c_void;

use cudarc::driver::sys;

use crate::error::{Error, Result};
use crate::gpu::{Gpu, Kernel};
use crate::memory::DeviceBuffer;

/// One kernel parameter, by value: a device pointer (`T*` / `const T*`) or an `int`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KernelArg {
    Ptr(u64),
    I32(i32),
}

impl KernelArg {
    /// A `const T*` parameter.
    pub(crate) fn buf<T>(b: &DeviceBuffer<T>) -> Self {
        KernelArg::Ptr(b.device_ptr())
    }

    /// A `T*` parameter the kernel writes (the `&mut` documents it at the call site).
    pub(crate) fn buf_mut<T>(b: &mut DeviceBuffer<T>) -> Self {
        KernelArg::Ptr(b.device_ptr())
    }
}

/// The launch attribute of a [`LaunchEx`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LaunchAttr {
    /// Cooperative launch: the driver checks that the whole grid is co-resident.
    Cooperative,
    /// Programmatic stream serialization allowed (PDL, sm_90+): the kernel may start before the
    /// previous kernel in the stream has finished, up to its `griddepcontrol.wait`.
    Programmatic,
    /// Thread-block clusters of this many CTAs along x.
    Cluster(u32),
}

impl LaunchAttr {
    fn raw(self) -> sys::CUlaunchAttribute {
        // SAFETY: CUlaunchAttribute is a plain C struct holding a union; all-zero is a valid
        // value, and the fields set below are the ones the chosen id reads.
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        match self {
            LaunchAttr::Cooperative => {
                attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_COOPERATIVE;
                attr.value.cooperative = 1;
            }
            LaunchAttr::Programmatic => {
                attr.id =
                    sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
                attr.value.programmaticStreamSerializationAllowed = 1;
            }
            LaunchAttr::Cluster(x) => {
                attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
                attr.value.clusterDim =
                    sys::CUlaunchAttributeValue_union__bindgen_ty_1 { x, y: 1, z: 1 };
            }
        }
        attr
    }
}

/// A 1-D launch configuration with one attribute, on the Gpu's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LaunchEx {
    pub grid: u32,
    pub block: u32,
    /// Dynamic shared memory per block, bytes (within what the kernel was allowed at load).
    pub smem: u32,
    pub attr: LaunchAttr,
}

impl LaunchEx {
    /// The driver's configuration; `attr` must outlive every use of the result.
    fn raw(&self, gpu: &Gpu, attr: &mut sys::CUlaunchAttribute) -> sys::CUlaunchConfig {
        sys::CUlaunchConfig {
            gridDimX: self.grid,
            gridDimY: 1,
            gridDimZ: 1,
            blockDimX: self.block,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: self.smem,
            hStream: gpu.stream().cu_stream(),
            attrs: attr,
            numAttrs: 1,
        }
    }
}

/// Queues `kernel<<<cfg>>>(args...)` on the Gpu's stream. Errors (binding the context, the
/// launch itself) come back as [`Error::Launch`] under the kernel's name. It does not wait for
/// the kernel: callers that honour `BLR_CUDA_SYNC` call [`Gpu::check_after_launch`].
///
/// # Safety
/// `args` must match the kernel's parameters in number, order and type (`KernelArg::Ptr` for a
/// pointer, `KernelArg::I32` for an `int`), every pointer must stay valid until the kernel has
/// finished, and the kernel must stay within the buffers it is given for this configuration.
/// For [`LaunchAttr::Programmatic`] the kernel must be correct when it overlaps the previous
/// kernel in the stream up to its `griddepcontrol.wait`; a grid-wide barrier additionally needs
/// the whole grid co-resident (checked by the driver only for [`LaunchAttr::Cooperative`]).
pub(crate) unsafe fn launch_ex(
    gpu: &Gpu,
    kernel: &Kernel,
    cfg: &LaunchEx,
    args: &[KernelArg],
) -> Result<()> {
    let launch_err = |source| Error::Launch {
        kernel: kernel.name().to_string(),
        source,
    };
    // The driver reads each parameter through a pointer to its value: keep the values in one
    // place that outlives the call.
    let mut values: Vec<KernelArg> = args.to_vec();
    let mut params: Vec<*mut c_void> = values
        .iter_mut()
        .map(|a| match a {
            KernelArg::Ptr(p) => (p as *mut u64).cast::<c_void>(),
            KernelArg::I32(v) => (v as *mut i32).cast::<c_void>(),
        })
        .collect();
    let mut attr = cfg.attr.raw();
    let raw = cfg.raw(gpu, &mut attr);
    gpu.context().bind_to_thread().map_err(launch_err)?;
    // SAFETY: `raw` points at one valid attribute (`attr`, alive until the call returns) and
    // this Gpu's live stream; `params` holds one pointer per kernel parameter into `values`,
    // alive until the call returns (the driver copies the values). That the arguments match the
    // kernel and keep it in bounds is the caller's contract (see # Safety).
    unsafe {
        sys::cuLaunchKernelEx(
            &raw,
            kernel.cuda_function().cu_function(),
            params.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    }
    .result()
    .map_err(launch_err)
}

/// How many clusters of `cfg`'s configuration (its attribute must be [`LaunchAttr::Cluster`])
/// the device holds at once; 0 when such a cluster never fits.
pub(crate) fn max_active_clusters(gpu: &Gpu, kernel: &Kernel, cfg: &LaunchEx) -> Result<u32> {
    let LaunchAttr::Cluster(size) = cfg.attr else {
        return Err(Error::LaunchConfig {
            kernel: kernel.name().to_string(),
            reason: "the cluster occupancy query needs a cluster launch attribute".into(),
        });
    };
    let mut attr = cfg.attr.raw();
    let raw = cfg.raw(gpu, &mut attr);
    let mut clusters: std::ffi::c_int = 0;
    gpu.context()
        .bind_to_thread()
        .map_err(Error::driver("binding the context"))?;
    // SAFETY: `raw` points at one valid attribute (alive until the call returns); the function
    // handle is live (owned by `kernel`); the out-pointer is valid.
    unsafe {
        sys::cuOccupancyMaxActiveClusters(&mut clusters, kernel.cuda_function().cu_function(), &raw)
    }
    .result()
    .map_err(Error::driver(format!(
        "cluster occupancy of {size} CTAs of {}",
        kernel.name()
    )))?;
    Ok(u32::try_from(clusters).unwrap_or(0))
}
