"""Tools agents call while they answer: built-in ones (their own context), and HTTP
endpoints. `validation` is shared by the API and the admin; `runner` executes calls on
workers."""
