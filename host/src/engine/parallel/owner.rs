//! A thread that owns a handle which may not cross threads (MPI's universe, an NCCL
//! communicator): it opens the handle, serves the calls the other threads send it, one at a
//! time, and closes it when the owner is dropped (the inbox closes, the thread is joined).

use std::sync::mpsc::{channel, Sender};
use std::sync::Mutex;
use std::thread::JoinHandle;

use retort_core::{Error, Result};

/// The sending side of a thread serving calls of type `C`.
pub struct Owner<C: Send + 'static> {
    calls: Mutex<Option<Sender<C>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl<C: Send + 'static> Owner<C> {
    /// Starts thread `name`: `open()` makes its state `S` and a value `I` handed back here (or
    /// the reason it could not), then `serve(&state, call)` answers every call.
    pub fn start<S, I: Send + 'static>(
        name: &str,
        open: impl FnOnce() -> std::result::Result<(S, I), String> + Send + 'static,
        serve: impl Fn(&S, C) + Send + 'static,
    ) -> Result<(Self, std::result::Result<I, String>)> {
        let (calls, inbox) = channel::<C>();
        let (ready, opened) = channel::<std::result::Result<I, String>>();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let state = match open() {
                    Ok((state, info)) => {
                        let _ = ready.send(Ok(info));
                        state
                    }
                    Err(e) => {
                        let _ = ready.send(Err(e));
                        return;
                    }
                };
                for call in inbox {
                    serve(&state, call);
                }
            })
            .map_err(|e| Error::failed(format!("starting the {name} thread"), e))?;
        let info = opened
            .recv()
            .unwrap_or_else(|_| Err(format!("the {name} thread stopped while starting")));
        let owner = Owner {
            calls: Mutex::new(Some(calls)),
            thread: Mutex::new(Some(thread)),
        };
        Ok((owner, info))
    }

    /// Sends `call`; false when the thread is gone.
    pub fn send(&self, call: C) -> bool {
        match self.calls.lock().ok().and_then(|c| c.clone()) {
            Some(calls) => calls.send(call).is_ok(),
            None => false,
        }
    }

    /// Sends the call `make` builds around an answer channel, and waits for the answer.
    pub fn ask<T>(&self, make: impl FnOnce(Sender<T>) -> C) -> Result<T> {
        let (tx, rx) = channel();
        match self.send(make(tx)).then(|| rx.recv().ok()).flatten() {
            Some(answer) => Ok(answer),
            None => Err(Error::Runtime("the collective backend's thread has stopped".into())),
        }
    }
}

impl<C: Send + 'static> Drop for Owner<C> {
    /// Closes the inbox and waits for the thread to close its handle (`MPI_Finalize`).
    fn drop(&mut self) {
        if let Ok(mut calls) = self.calls.lock() {
            calls.take();
        }
        if let Some(t) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A state that may not cross threads, served from its own.
    #[test]
    fn calls_are_served_on_the_owning_thread_and_failures_to_open_are_told() {
        let (owner, info) = Owner::start(
            "doubler",
            || Ok((std::rc::Rc::new(2), "ready")),
            |factor: &std::rc::Rc<i32>, (x, answer): (i32, Sender<i32>)| {
                let _ = answer.send(x * **factor);
            },
        )
        .expect("start");
        assert_eq!(info, Ok("ready"));
        assert_eq!(owner.ask(|tx| (21, tx)).expect("answer"), 42);
        drop(owner);
        let (_, info) =
            Owner::<()>::start("broken", || Err::<((), ()), _>("no device".into()), |_: &(), _| {}).expect("start");
        assert_eq!(info, Err("no device".to_string()));
    }
}
