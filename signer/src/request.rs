//! PodCertificateRequests as the API server sends them, and their
//! validation.
