//! credlet's image guard: a CRI proxy between the kubelet and the container
//! runtime that lets a pod use a cached private image only if the pod's own
//! pull credentials can pull it.

pub mod credential;
pub mod decide;
pub mod egress;
pub mod events;
pub mod failure;
pub mod grpc;
pub mod guard;
pub mod hosts;
pub mod pods;
pub mod policy;
pub mod proxy;
pub mod records;
pub mod reference;
pub mod registry;
pub mod resolve;
pub mod www_authenticate;
