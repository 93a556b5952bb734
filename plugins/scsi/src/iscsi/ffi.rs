//! The part of libiscsi's C interface (Debian libiscsi-dev, 1.19, `libiscsi.so.7`) the
//! transport uses: a context, its asynchronous login and SCSI commands, and its event
//! loop hooks. Linked dynamically.

use std::os::raw::{c_char, c_int, c_uchar, c_void};

/// `struct iscsi_context`: opaque.
#[repr(C)]
pub struct IscsiContext {
    _private: [u8; 0],
}

pub const SCSI_CDB_MAX_SIZE: usize = 16;

/// The leading fields of `struct scsi_sense` (scsi-lowlevel.h).
#[repr(C)]
pub struct ScsiSense {
    pub error_type: c_uchar,
    pub key: c_int,
    /// ASC in bits 15-8, ASCQ in bits 7-0.
    pub ascq: c_int,
}

/// The leading fields of `struct scsi_task` (scsi-lowlevel.h), up to the sense data; the
/// transport reads these and never allocates or copies the struct.
#[repr(C)]
pub struct ScsiTask {
    pub status: c_int,
    pub cdb_size: c_int,
    pub xfer_dir: c_int,
    pub expxferlen: c_int,
    pub cdb: [c_uchar; SCSI_CDB_MAX_SIZE],
    pub residual_status: c_int,
    pub residual: usize,
    pub sense: ScsiSense,
}

/// `struct iscsi_data`: data-out of a command.
#[repr(C)]
pub struct IscsiData {
    pub size: usize,
    pub data: *mut c_uchar,
}

pub type CommandCb = unsafe extern "C" fn(
    iscsi: *mut IscsiContext,
    status: c_int,
    command_data: *mut c_void,
    private_data: *mut c_void,
);

pub const SCSI_XFER_NONE: c_int = 0;
pub const SCSI_XFER_READ: c_int = 1;
pub const SCSI_XFER_WRITE: c_int = 2;
pub const SCSI_RESIDUAL_UNDERFLOW: c_int = 1;
pub const SCSI_STATUS_GOOD: c_int = 0;
pub const SCSI_STATUS_CANCELLED: c_int = 0x0f00_0000;
pub const SCSI_STATUS_TIMEOUT: c_int = 0x0f00_0002;
pub const ISCSI_SESSION_NORMAL: c_int = 2;
pub const ISCSI_HEADER_DIGEST_NONE: c_int = 0;

#[link(name = "iscsi")]
extern "C" {
    pub fn iscsi_create_context(initiator_name: *const c_char) -> *mut IscsiContext;
    pub fn iscsi_destroy_context(iscsi: *mut IscsiContext) -> c_int;
    pub fn iscsi_get_error(iscsi: *mut IscsiContext) -> *const c_char;
    pub fn iscsi_set_targetname(iscsi: *mut IscsiContext, name: *const c_char) -> c_int;
    pub fn iscsi_set_session_type(iscsi: *mut IscsiContext, kind: c_int) -> c_int;
    pub fn iscsi_set_header_digest(iscsi: *mut IscsiContext, digest: c_int) -> c_int;
    pub fn iscsi_set_initiator_username_pwd(
        iscsi: *mut IscsiContext,
        user: *const c_char,
        passwd: *const c_char,
    ) -> c_int;
    pub fn iscsi_set_timeout(iscsi: *mut IscsiContext, seconds: c_int) -> c_int;
    pub fn iscsi_set_noautoreconnect(iscsi: *mut IscsiContext, state: c_int);
    pub fn iscsi_full_connect_async(
        iscsi: *mut IscsiContext,
        portal: *const c_char,
        lun: c_int,
        cb: CommandCb,
        private_data: *mut c_void,
    ) -> c_int;
    pub fn iscsi_get_fd(iscsi: *mut IscsiContext) -> c_int;
    pub fn iscsi_which_events(iscsi: *mut IscsiContext) -> c_int;
    pub fn iscsi_service(iscsi: *mut IscsiContext, revents: c_int) -> c_int;
    pub fn scsi_create_task(
        cdb_size: c_int,
        cdb: *mut c_uchar,
        xfer_dir: c_int,
        expxferlen: c_int,
    ) -> *mut ScsiTask;
    pub fn scsi_free_scsi_task(task: *mut ScsiTask);
    pub fn scsi_task_add_data_in_buffer(
        task: *mut ScsiTask,
        len: c_int,
        buf: *mut c_uchar,
    ) -> c_int;
    pub fn iscsi_scsi_command_async(
        iscsi: *mut IscsiContext,
        lun: c_int,
        task: *mut ScsiTask,
        cb: CommandCb,
        data: *mut IscsiData,
        private_data: *mut c_void,
    ) -> c_int;
}

/// `struct pollfd` and poll(2), for the event thread.
#[repr(C)]
pub struct PollFd {
    pub fd: c_int,
    pub events: i16,
    pub revents: i16,
}

pub const POLLIN: i16 = 0x1;

extern "C" {
    pub fn poll(fds: *mut PollFd, nfds: u64, timeout_ms: c_int) -> c_int;
}
