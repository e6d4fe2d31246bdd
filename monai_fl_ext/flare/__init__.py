"""Everything that imports nvflare: the client script, the server controller, the job builder."""
