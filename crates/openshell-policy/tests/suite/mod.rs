mod errors;
mod parse;
mod rego;
mod shipped;
