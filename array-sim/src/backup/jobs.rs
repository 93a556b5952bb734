//! Copy jobs: numbered, polled, kept up to `KEPT_JOBS` after they end.

use super::*;

impl Firmware {
    pub(super) fn new_job(
        &self,
        st: &mut State,
        kind: &str,
        lu: u8,
        device: &str,
        total: u64,
    ) -> u32 {
        let id = st.next_job;
        st.next_job = st.next_job.wrapping_add(1).max(1);
        st.busy_devices.insert(device.to_string());
        st.jobs.insert(
            id,
            Job {
                status: JobStatus {
                    id,
                    kind: kind.to_string(),
                    lu: u32::from(lu),
                    device: device.to_string(),
                    state: JobState::Running,
                    message: None,
                    total_blocks: total,
                    done_blocks: 0,
                    working_volume: None,
                    saved_blocks: 0,
                    elapsed_us: 0,
                },
                started: Instant::now(),
                ended: None,
            },
        );
        id
    }

    pub(super) fn job(&self, id: u32) -> Result<JobStatus, Refusal> {
        let st = self.lock();
        let j = st.jobs.get(&id).ok_or_else(|| {
            param_err(format!(
                "no job {id} (the array keeps the last {KEPT_JOBS})"
            ))
        })?;
        let mut s = j.status.clone();
        s.elapsed_us = j
            .ended
            .unwrap_or_else(Instant::now)
            .duration_since(j.started)
            .as_micros() as u64;
        Ok(s)
    }
}

pub(super) fn finish_job(st: &mut State, id: u32, err: Option<Refusal>) {
    if let Some(j) = st.jobs.get_mut(&id) {
        j.ended = Some(Instant::now());
        match err {
            None => j.status.state = JobState::Done,
            Some(e) => {
                j.status.state = JobState::Failed;
                j.status.message = Some(e.message);
            }
        }
    }
    while st.jobs.len() > KEPT_JOBS {
        let Some(&oldest) = st.jobs.keys().next() else {
            break;
        };
        if st.jobs[&oldest].ended.is_none() {
            break;
        }
        st.jobs.remove(&oldest);
    }
}
