//! The route table: every route the server answers goes through [`Routes`], which registers it
//! with actix and records its method and path. The OpenAPI document (`openapi.rs`) is checked
//! against exactly this record, so a route cannot be added without being described.
//!
//! All methods of one path form one resource; a method the path does not serve is answered
//! `405` with an `Allow` header and the JSON error body (actix's own 405 has an empty body).

use super::error::ApiError;
use actix_web::{web, FromRequest, Handler, HttpRequest, Resource, Responder};

/// One registered route: its method and its path as actix matches it (`{name}` segments, the
/// same template syntax OpenAPI uses).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Route {
    /// `GET`, `POST`, `DELETE`.
    pub method: &'static str,
    pub path: &'static str,
}

/// Routes being collected, one actix resource per path.
pub struct Routes {
    resources: Vec<(&'static str, Vec<&'static str>, Resource)>,
}

impl Default for Routes {
    fn default() -> Self {
        Self::new()
    }
}

impl Routes {
    pub fn new() -> Self {
        Self {
            resources: Vec::new(),
        }
    }

    pub fn get<F, Args>(&mut self, path: &'static str, handler: F) -> &mut Self
    where
        F: Handler<Args>,
        Args: FromRequest + 'static,
        F::Output: Responder + 'static,
    {
        self.add("GET", path, web::get().to(handler))
    }

    pub fn post<F, Args>(&mut self, path: &'static str, handler: F) -> &mut Self
    where
        F: Handler<Args>,
        Args: FromRequest + 'static,
        F::Output: Responder + 'static,
    {
        self.add("POST", path, web::post().to(handler))
    }

    pub fn delete<F, Args>(&mut self, path: &'static str, handler: F) -> &mut Self
    where
        F: Handler<Args>,
        Args: FromRequest + 'static,
        F::Output: Responder + 'static,
    {
        self.add("DELETE", path, web::delete().to(handler))
    }

    fn add(
        &mut self,
        method: &'static str,
        path: &'static str,
        route: actix_web::Route,
    ) -> &mut Self {
        let index = match self.resources.iter().position(|(p, ..)| *p == path) {
            Some(i) => i,
            None => {
                self.resources.push((path, Vec::new(), web::resource(path)));
                self.resources.len() - 1
            }
        };
        let (_, methods, resource) = &mut self.resources[index];
        assert!(
            !methods.contains(&method),
            "{method} {path} is registered twice"
        );
        methods.push(method);
        let taken = std::mem::replace(resource, web::resource(path));
        *resource = taken.route(route);
        self
    }

    /// Registers every resource with `cfg`; returns what was registered, sorted.
    pub fn register(self, cfg: &mut web::ServiceConfig) -> Vec<Route> {
        let mut listed = Vec::new();
        for (path, methods, resource) in self.resources {
            let allow = methods.join(", ");
            listed.extend(methods.into_iter().map(|method| Route { method, path }));
            cfg.service(resource.default_service(web::to(move |req: HttpRequest| {
                let allow = allow.clone();
                async move {
                    Err::<actix_web::HttpResponse, _>(ApiError::MethodNotAllowed {
                        message: format!(
                            "{} is not served at {}; use {allow}",
                            req.method(),
                            req.path()
                        ),
                        allow,
                    })
                }
            })));
        }
        listed.sort();
        listed
    }
}
