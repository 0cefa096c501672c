"""Real-time delivery to web clients: the process's stream hub (one set of Redis
connections shared by every open event stream and every waiting request) and the
request/reply records a worker answers a waiting request on."""
