//! `#[memoize]`, the attribute of cache-money. Use it as `cache_money::memoize`, whose page
//! documents the options, the generated companions and an example; this crate only rewrites
//! an `async fn` into calls of cache-money's hidden runtime (`cache_money::__private`).
//!
//! Every refusal is a `syn::Error` of this crate's own, naming what to change, so the
//! compile-fail tests (`tests/ui/*.stderr`) hold across compiler versions.

use proc_macro::TokenStream;
use proc_macro2::{Span, TokenStream as TokenStream2, TokenTree};
use quote::{ToTokens, format_ident, quote, quote_spanned};
use syn::{
    Attribute, Error, Expr, ExprLit, FnArg, GenericParam, Ident, ItemFn, Lit, LitStr, Meta, Pat,
    PatType, ReturnType, Token, Type, ext::IdentExt, parse::Parser, punctuated::Punctuated,
    spanned::Spanned,
};

/// Memoizes an `async fn` in cache-money. Documented on its re-export, `cache_money::memoize`.
#[proc_macro_attribute]
pub fn memoize(attr: TokenStream, item: TokenStream) -> TokenStream {
    let item = TokenStream2::from(item);
    match expand(attr.into(), item.clone()) {
        Ok(tokens) => tokens.into(),
        // The item stays as written, so the error is the only one its callers see.
        Err(err) => {
            let mut out = err.to_compile_error();
            out.extend(item);
            out.into()
        }
    }
}

/// The longest namespace or function name the service accepts (`cache_money::key`).
const MAX_NAME_LEN: usize = 128;

/// The options given to the attribute.
#[derive(Default)]
struct Options {
    ns: Option<LitStr>,
    name: Option<LitStr>,
    ttl: Option<Expr>,
    key: Option<Expr>,
    skip: Vec<Ident>,
    client: Option<Expr>,
    version: Option<u32>,
    cache_none: Option<bool>,
    tags: Vec<LitStr>,
    lease: Option<Expr>,
    refresh_after: Option<Expr>,
    stale_if_error: Option<Expr>,
}

const OPTIONS: &str = "ns, name, ttl, key, skip(…), client, version, cache_none, tags, lease, \
                       refresh_after, stale_if_error";

fn parse_options(attr: TokenStream2) -> syn::Result<Options> {
    let metas = Punctuated::<Meta, Token![,]>::parse_terminated.parse2(attr)?;
    let mut options = Options::default();
    let mut seen = Vec::new();
    for meta in metas {
        let Some(option) = meta.path().get_ident().map(Ident::to_string) else {
            return Err(Error::new(
                first_span(&meta.path()),
                format!("#[memoize]: unknown option; the options are {OPTIONS}"),
            ));
        };
        if seen.contains(&option) {
            return Err(Error::new(
                first_span(&meta.path()),
                format!("#[memoize]: `{option}` is given twice"),
            ));
        }
        seen.push(option.clone());
        match (option.as_str(), meta) {
            ("skip", Meta::List(list)) => {
                options.skip = list
                    .parse_args_with(|input: syn::parse::ParseStream<'_>| {
                        Punctuated::<Ident, Token![,]>::parse_terminated_with(
                            input,
                            Ident::parse_any,
                        )
                    })?
                    .into_iter()
                    .collect();
            }
            ("skip", other) => {
                return Err(Error::new(
                    first_span(&other),
                    "#[memoize]: write `skip(arg, …)` with the arguments to leave out of the key",
                ));
            }
            (_, Meta::NameValue(pair)) => {
                let value = pair.value;
                match option.as_str() {
                    "ns" => options.ns = Some(name_literal("ns", &value)?),
                    "name" => options.name = Some(name_literal("name", &value)?),
                    "ttl" => options.ttl = Some(value),
                    "key" => options.key = Some(value),
                    "client" => options.client = Some(value),
                    "version" => options.version = Some(version_literal(&value)?),
                    "cache_none" => options.cache_none = Some(bool_literal(&value)?),
                    "tags" => options.tags = tag_literals(&value)?,
                    "lease" => options.lease = Some(value),
                    "refresh_after" => options.refresh_after = Some(value),
                    "stale_if_error" => options.stale_if_error = Some(value),
                    _ => {
                        return Err(Error::new(
                            first_span(&pair.path),
                            format!(
                                "#[memoize]: unknown option `{option}`; the options are {OPTIONS}"
                            ),
                        ));
                    }
                }
            }
            (_, other) => {
                return Err(Error::new(
                    first_span(&other),
                    format!("#[memoize]: write `{option} = …`; the options are {OPTIONS}"),
                ));
            }
        }
    }
    Ok(options)
}

/// A duration option (`ttl`, `lease`, …) as the runtime takes it: `None`, or a function
/// evaluating the expression when the handle is made; an integer literal is seconds.
fn duration_option(option: &Option<Expr>) -> TokenStream2 {
    match option {
        None => quote!(::core::option::Option::None),
        Some(Expr::Lit(ExprLit {
            lit: Lit::Int(seconds),
            ..
        })) => {
            quote_spanned!(seconds.span()=> ::core::option::Option::Some(|| ::std::time::Duration::from_secs(#seconds)))
        }
        Some(duration) => {
            quote_spanned!(duration.span()=> ::core::option::Option::Some(|| #duration))
        }
    }
}

/// A string literal obeying the service's naming rule, checked now rather than at run time.
fn name_literal(option: &str, value: &Expr) -> syn::Result<LitStr> {
    let Expr::Lit(ExprLit {
        lit: Lit::Str(literal),
        ..
    }) = value
    else {
        return Err(Error::new(
            first_span(&value),
            format!("#[memoize]: `{option}` takes a string literal"),
        ));
    };
    let text = literal.value().replace("::", ".");
    check_name(option, &text, literal.span())?;
    Ok(LitStr::new(&text, literal.span()))
}

fn check_name(what: &str, text: &str, span: Span) -> syn::Result<()> {
    let valid_byte = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-');
    if text.is_empty() || text.len() > MAX_NAME_LEN || !text.bytes().all(valid_byte) {
        return Err(Error::new(
            span,
            format!(
                "#[memoize]: {what} {text:?} breaks cache-money's naming rule: 1-{MAX_NAME_LEN} \
                 bytes of [A-Za-z0-9_.-]"
            ),
        ));
    }
    Ok(())
}

fn version_literal(value: &Expr) -> syn::Result<u32> {
    if let Expr::Lit(ExprLit {
        lit: Lit::Int(literal),
        ..
    }) = value
        && let Ok(version) = literal.base10_parse::<u32>()
        && version >= 1
    {
        return Ok(version);
    }
    Err(Error::new(
        first_span(&value),
        "#[memoize]: `version` takes an integer literal from 1 (1 is the unversioned key space)",
    ))
}

/// `tags = ["user:{id}", …]`: an array of string literals, each a `format!` string.
fn tag_literals(value: &Expr) -> syn::Result<Vec<LitStr>> {
    let refused = || {
        Error::new(
            first_span(&value),
            "#[memoize]: `tags` takes an array of string literals, e.g. `tags = [\"user:{id}\"]`, \
             where `{id}` is an argument",
        )
    };
    let Expr::Array(array) = value else {
        return Err(refused());
    };
    array
        .elems
        .iter()
        .map(|element| match element {
            Expr::Lit(ExprLit {
                lit: Lit::Str(literal),
                ..
            }) => Ok(literal.clone()),
            _ => Err(refused()),
        })
        .collect()
}

/// The argument names a tag's `{name}` / `{name:spec}` placeholders use, in order, with
/// `{{` and `}}` as literal braces; an error for a placeholder without a name (`{}`, `{0}`)
/// or an unmatched brace, which `format!` would refuse less clearly.
fn tag_placeholders(tag: &LitStr) -> syn::Result<Vec<String>> {
    let text = tag.value();
    let refuse = |why: &str| {
        Error::new(
            tag.span(),
            format!(
                "#[memoize]: tag {text:?}: {why}; write `{{name}}` for an argument, `{{{{` and `}}}}` for braces"
            ),
        )
    };
    let mut names = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
            }
            '{' => {
                let mut inside = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some(c) => inside.push(c),
                        None => return Err(refuse("a `{` is not closed")),
                    }
                }
                let name = inside.split(':').next().unwrap_or_default().trim();
                let is_ident = name
                    .chars()
                    .next()
                    .is_some_and(|first| first.is_alphabetic() || first == '_')
                    && name.chars().all(|c| c.is_alphanumeric() || c == '_');
                if !is_ident {
                    return Err(refuse(&format!("`{{{inside}}}` names no argument")));
                }
                names.push(name.to_owned());
            }
            '}' => return Err(refuse("a `}` is not opened")),
            _ => {}
        }
    }
    if text.is_empty() {
        return Err(refuse("a tag must not be empty"));
    }
    Ok(names)
}

fn bool_literal(value: &Expr) -> syn::Result<bool> {
    match value {
        Expr::Lit(ExprLit {
            lit: Lit::Bool(literal),
            ..
        }) => Ok(literal.value),
        _ => Err(Error::new(
            first_span(&value),
            "#[memoize]: `cache_none` takes `true` or `false`",
        )),
    }
}

/// One typed argument: its name (for the key and the calls) and its type.
struct Arg {
    name: Ident,
    ty: Type,
}

/// How the function receives `self`, if it is a method.
enum Receiver {
    None,
    Ref(TokenStream2),
}

/// Where `tokens` hold `impl`, if anywhere: an `impl Trait` type, maybe nested
/// (`Vec<impl T>`).
fn find_impl(tokens: TokenStream2) -> Option<Span> {
    tokens.into_iter().find_map(|token| match token {
        TokenTree::Ident(ident) if ident == "impl" => Some(ident.span()),
        TokenTree::Group(group) => find_impl(group.stream()),
        _ => None,
    })
}

/// Where `tokens` name `Self`, if anywhere.
fn find_self_type(tokens: TokenStream2) -> Option<Span> {
    tokens.into_iter().find_map(|token| match token {
        TokenTree::Ident(ident) if ident == "Self" => Some(ident.span()),
        TokenTree::Group(group) => find_self_type(group.stream()),
        _ => None,
    })
}

/// Where a function without `self` shows it is an associated function: `Self` in its
/// signature or its body (outside items nested there, which may be `impl`s of their own). A
/// free function cannot name `Self`, so this never refuses one; an associated function that
/// never names `Self` is not caught here (the compiler then reports the module it cannot hold).
fn associated_without_self(function: &ItemFn) -> Option<Span> {
    let mut body = function
        .block
        .stmts
        .iter()
        .filter(|stmt| !matches!(stmt, syn::Stmt::Item(_)));
    find_self_type(function.sig.to_token_stream())
        .or_else(|| body.find_map(|stmt| find_self_type(stmt.to_token_stream())))
}

/// The span of the first token of `node`. Errors point there rather than at the whole node:
/// a span over several tokens is only joined on nightly compilers, so error snapshots would
/// differ between stable and nightly.
fn first_span(node: &dyn ToTokens) -> Span {
    node.to_token_stream()
        .into_iter()
        .next()
        .map_or_else(Span::call_site, |token| token.span())
}

/// Whether a return type is a `Result` by name (`Result`, `io::Result`, `anyhow::Result`):
/// `Ok` is cached, `Err` never.
fn is_result(ty: &Type) -> bool {
    match ty {
        Type::Path(path) => path
            .path
            .segments
            .last()
            .is_some_and(|segment| segment.ident == "Result"),
        Type::Paren(inner) => is_result(&inner.elem),
        Type::Group(inner) => is_result(&inner.elem),
        _ => false,
    }
}

fn check_signature(function: &ItemFn) -> syn::Result<(Receiver, Vec<Arg>, Type)> {
    let sig = &function.sig;
    if sig.asyncness.is_none() {
        return Err(Error::new(
            sig.fn_token.span(),
            "#[memoize] needs an `async fn`: a memoized call waits on the cache service; \
             write `async fn` and `.await` its calls",
        ));
    }
    if let Some(constness) = &sig.constness {
        return Err(Error::new(
            constness.span(),
            "#[memoize] cannot memoize a `const fn`; remove `const`",
        ));
    }
    if let Some(unsafety) = &sig.unsafety {
        return Err(Error::new(
            unsafety.span(),
            "#[memoize] cannot memoize an `unsafe fn`; memoize a safe wrapper around it",
        ));
    }
    if let Some(abi) = &sig.abi {
        return Err(Error::new(
            first_span(&abi),
            "#[memoize] cannot memoize an `extern` function; memoize a Rust wrapper around it",
        ));
    }
    if let Some(variadic) = &sig.variadic {
        return Err(Error::new(
            first_span(&variadic),
            "#[memoize] cannot memoize a variadic function",
        ));
    }
    for param in &sig.generics.params {
        if !matches!(param, GenericParam::Lifetime(_)) {
            return Err(Error::new(
                first_span(&param),
                "#[memoize] does not support generic parameters: every call must key and store \
                 one concrete type; write a non-generic function per type (each with its own \
                 `name = \"…\"`)",
            ));
        }
    }

    let mut receiver = Receiver::None;
    let mut args = Vec::new();
    for input in &sig.inputs {
        match input {
            FnArg::Receiver(this) => {
                if this.reference.is_none() || this.colon_token.is_some() {
                    return Err(Error::new(
                        first_span(&this),
                        "#[memoize] methods take `&self` or `&mut self` (left out of the key); \
                         for another receiver, memoize a function it calls",
                    ));
                }
                receiver = Receiver::Ref(this.to_token_stream());
            }
            FnArg::Typed(PatType { pat, ty, .. }) => {
                let name = match pat.as_ref() {
                    Pat::Ident(ident) if ident.by_ref.is_none() && ident.subpat.is_none() => {
                        ident.ident.clone()
                    }
                    other => {
                        return Err(Error::new(
                            first_span(&other),
                            "#[memoize] needs a plain name for each argument (`name: Type`): \
                             the arguments are passed on by name; destructure inside the body",
                        ));
                    }
                };
                if let Some(span) = find_impl(ty.to_token_stream()) {
                    return Err(Error::new(
                        span,
                        "#[memoize] does not support `impl Trait` arguments: they are generic, \
                         and every call must key one concrete type; name the type",
                    ));
                }
                args.push(Arg {
                    name,
                    ty: (**ty).clone(),
                });
            }
        }
    }

    if matches!(receiver, Receiver::None)
        && let Some(span) = associated_without_self(function)
    {
        return Err(Error::new(
            span,
            "#[memoize]: associated functions without self are not supported (their cache's \
             controls would need a module inside the `impl`); make it a free function or take \
             `&self`",
        ));
    }

    let output = match &sig.output {
        ReturnType::Default => {
            return Err(Error::new(
                sig.paren_token.span.close(),
                "#[memoize] needs a return type: the result is what is cached",
            ));
        }
        ReturnType::Type(_, ty) => (**ty).clone(),
    };
    if let Some(span) = find_impl(output.to_token_stream()) {
        return Err(Error::new(
            span,
            "#[memoize] does not support an `impl Trait` result: it is stored and read back, \
             so name its type",
        ));
    }
    Ok((receiver, args, output))
}

/// Attributes that must follow the function onto every item made from it.
fn is_cfg(attr: &Attribute) -> bool {
    attr.path().is_ident("cfg") || attr.path().is_ident("cfg_attr")
}

/// Lint levels the user set, which the body (now in the compute function) keeps.
fn is_lint_level(attr: &Attribute) -> bool {
    ["allow", "warn", "deny", "expect", "forbid"]
        .iter()
        .any(|level| attr.path().is_ident(level))
}

fn expand(attr: TokenStream2, item: TokenStream2) -> syn::Result<TokenStream2> {
    let function: ItemFn = syn::parse2(item).map_err(|err| {
        Error::new(
            err.span(),
            "#[memoize] applies to an `async fn` (a free function or a method with `&self`)",
        )
    })?;
    let options = parse_options(attr)?;
    let (receiver, args, output) = check_signature(&function)?;

    let fn_ident = &function.sig.ident;
    let name_text = fn_ident.unraw().to_string();
    let name = match &options.name {
        Some(name) => name.clone(),
        None => {
            check_name("the function name", &name_text, fn_ident.span()).map_err(|err| {
                Error::new(
                    err.span(),
                    format!("{err}; give the cache a name with `name = \"…\"`"),
                )
            })?;
            LitStr::new(&name_text, fn_ident.span())
        }
    };
    let namespace = match &options.ns {
        Some(ns) => ns.to_token_stream(),
        None => quote!(::core::module_path!()),
    };

    for skipped in &options.skip {
        let known = skipped == "self" || args.iter().any(|arg| arg.name == *skipped);
        if !known {
            return Err(Error::new(
                skipped.span(),
                format!("#[memoize]: skip: `{fn_ident}` has no argument named `{skipped}`"),
            ));
        }
    }
    for tag in &options.tags {
        for placeholder in tag_placeholders(tag)? {
            if !args.iter().any(|arg| arg.name == placeholder) {
                return Err(Error::new(
                    tag.span(),
                    format!("#[memoize]: tags: `{fn_ident}` has no argument named `{placeholder}`"),
                ));
            }
        }
    }
    if let (Some(key), false) = (&options.key, options.skip.is_empty()) {
        return Err(Error::new(
            first_span(&key),
            "#[memoize]: `key` and `skip` do not go together: the key expression alone decides \
             what is keyed; leave out `skip`",
        ));
    }

    let rt = quote!(::cache_money::__private);
    let mixed = Span::mixed_site();
    let prepared = Ident::new("prepared", mixed);
    let compute_fn = format_ident!("__cache_money_{}_compute", name_text);
    let site_fn = format_ident!("__cache_money_{}_site", name_text);
    let client_fn = format_ident!("__cache_money_{}_client", name_text);
    let is_method = matches!(receiver, Receiver::Ref(_));
    // How the items made here name each other: `Self::`/`self.` in an impl, `super::` from the
    // companions' module for a free function.
    let (site_call, client_call, compute_call, outer) = if is_method {
        (
            // `Self` is keyed too: a generic `impl`'s instantiations share the one `static`.
            quote!(Self::#site_fn().of::<Self>()),
            quote!(self.#client_fn()),
            quote!(self.#compute_fn),
            quote!(Self::),
        )
    } else {
        (
            quote!(#site_fn()),
            quote!(#client_fn()),
            quote!(#compute_fn),
            quote!(super::),
        )
    };

    let ttl = duration_option(&options.ttl);
    let lease = duration_option(&options.lease);
    let refresh_after = duration_option(&options.refresh_after);
    let stale_if_error = duration_option(&options.stale_if_error);
    let version = options.version.unwrap_or(1);
    let cache_none = options.cache_none.unwrap_or(false);

    let attrs = &function.attrs;
    let cfgs: Vec<&Attribute> = attrs.iter().filter(|attr| is_cfg(attr)).collect();
    let lints: Vec<&Attribute> = attrs.iter().filter(|attr| is_lint_level(attr)).collect();
    let vis = &function.vis;
    let generics = &function.sig.generics;
    let where_clause = &generics.where_clause;
    let arg_names: Vec<&Ident> = args.iter().map(|arg| &arg.name).collect();
    let arg_types: Vec<&Type> = args.iter().map(|arg| &arg.ty).collect();
    // Parameters as the generated functions declare them: names only (no `mut`).
    let params = quote!(#(#arg_names: #arg_types),*);
    let self_param = match &receiver {
        Receiver::Ref(this) => quote!(#this,),
        Receiver::None => quote!(),
    };
    let shared_self = if is_method { quote!(&self,) } else { quote!() };

    // The key: the `key` expression, or the arguments not skipped, each borrowed, as the
    // argument list (a tuple). Each element carries its argument's span, so a type that is
    // not `Serialize` is reported at the argument.
    let key = match &options.key {
        Some(key) => quote_spanned!(key.span()=> &(#key)),
        None => {
            let keyed = args
                .iter()
                .filter(|arg| !options.skip.contains(&arg.name))
                .map(|arg| {
                    let name = &arg.name;
                    quote_spanned!(arg.ty.span()=> &#name)
                });
            quote!(&(#(#keyed,)*))
        }
    };
    let client_arg = match &options.client {
        Some(_) => quote!(::core::option::Option::Some(#client_call)),
        None => quote!(::core::option::Option::None),
    };
    let client_item = options.client.as_ref().map(|client| {
        quote_spanned! {client.span()=>
            #(#cfgs)*
            #[doc(hidden)]
            #[allow(dead_code)]
            fn #client_fn(#shared_self) -> ::cache_money::Client {
                ::core::clone::Clone::clone(
                    <_ as ::std::borrow::Borrow<::cache_money::Client>>::borrow(&(#client)),
                )
            }
        }
    });
    let (run, rerun) = if is_result(&output) {
        (quote!(try_memoize), quote!(try_refresh))
    } else {
        (quote!(memoize), quote!(refresh))
    };
    // Each tag is `format!`ted from the (borrowed) arguments before they move into the body.
    let tagged = if options.tags.is_empty() {
        quote!()
    } else {
        let tags = &options.tags;
        quote!(.tagged(::std::vec![#(::std::format!(#tags)),*]))
    };
    let call = |method: &TokenStream2, site: &TokenStream2, client: &TokenStream2, compute| {
        quote! {
            let #prepared = #site.prepare(#client, #key)#tagged;
            #prepared.#method(move || #compute(#(#arg_names),*)).await
        }
    };
    let wrapper_body = call(&run, &site_call, &client_arg, &compute_call);
    let compute_body = &function.block;

    let mut wrapper_sig = function.sig.clone();
    for input in wrapper_sig.inputs.iter_mut() {
        if let FnArg::Typed(PatType { pat, .. }) = input
            && let Pat::Ident(ident) = pat.as_mut()
        {
            ident.mutability = None;
        }
    }
    let mut compute_sig = function.sig.clone();
    compute_sig.ident = compute_fn.clone();

    let common = quote! {
        #(#attrs)*
        #vis #wrapper_sig {
            #wrapper_body
        }

        #(#cfgs)*
        #(#lints)*
        // Unused when the memoized function is: warned about once, there, not here too.
        #[doc(hidden)]
        #[allow(dead_code, clippy::too_many_arguments)]
        #compute_sig #compute_body

        #(#cfgs)*
        #[doc(hidden)]
        #[allow(dead_code)]
        fn #site_fn() -> &'static #rt::Site {
            static SITE: #rt::Site =
                #rt::Site::new(#namespace, #name, #ttl, #version, #cache_none)
                    .leases(#lease, #refresh_after, #stale_if_error);
            &SITE
        }

        #client_item
    };

    let r = quote!(::core::result::Result);
    let error = quote!(::cache_money::Error);
    let doc_bust = format!(
        " Removes the cached result of one call of `{name_text}` (the seed's `fn.bust(*args)`); \
         returns whether there was one."
    );
    let doc_bust_all = format!(
        " Removes every cached call of `{name_text}`, of every version (the seed's \
         `fn.bust_all()`); returns how many there were."
    );
    let doc_refresh = format!(
        " Runs `{name_text}` now and overwrites its cached result for these arguments; returns \
         the new result."
    );
    let doc_function = format!(" The `cache_money::Function` handle `{name_text}` is cached by.");

    if is_method {
        let bust = format_ident!("{}_bust", name_text);
        let bust_all = format_ident!("{}_bust_all", name_text);
        let refresh = format_ident!("{}_refresh", name_text);
        let handle = format_ident!("{}_function", name_text);
        let refresh_body = call(&rerun, &site_call, &client_arg, &compute_call);
        Ok(quote! {
            #common

            #(#cfgs)*
            #[doc = #doc_bust]
            #[allow(dead_code, unused_variables)]
            #vis async fn #bust #generics (&self, #params) -> #r<bool, #error> #where_clause {
                #site_call.bust(#client_arg, #key).await
            }

            #(#cfgs)*
            #[doc = #doc_bust_all]
            #[allow(dead_code)]
            #vis async fn #bust_all(&self) -> #r<u64, #error> {
                #site_call.bust_all(#client_arg).await
            }

            #(#cfgs)*
            #[doc = #doc_refresh]
            #[allow(dead_code)]
            #vis async fn #refresh #generics (#self_param #params) -> #output #where_clause {
                #refresh_body
            }

            #(#cfgs)*
            #[doc = #doc_function]
            #[allow(dead_code)]
            #vis fn #handle(&self) -> #r<::cache_money::Function, #error> {
                #site_call.function(#client_arg)
            }
        })
    } else {
        let site_in_mod = quote!(#outer #site_fn());
        let client_in_mod = match &options.client {
            Some(_) => quote!(::core::option::Option::Some(#outer #client_fn())),
            None => quote!(::core::option::Option::None),
        };
        let compute_in_mod = quote!(#outer #compute_fn);
        let refresh_body = call(&rerun, &site_in_mod, &client_in_mod, &compute_in_mod);
        let doc_mod = format!(
            " The cache of `{name_text}` (`#[cache_money::memoize]`): `bust`, `bust_all`, \
             `refresh` and its `function()` handle."
        );
        Ok(quote! {
            #common

            #(#cfgs)*
            #[doc = #doc_mod]
            #[allow(dead_code)]
            #vis mod #fn_ident {
                #[allow(unused_imports)]
                use super::*;

                #[doc = #doc_bust]
                #[allow(unused_variables)] // skipped arguments
                pub async fn bust #generics (#params) -> #r<bool, #error> #where_clause {
                    #site_in_mod.bust(#client_in_mod, #key).await
                }

                #[doc = #doc_bust_all]
                pub async fn bust_all() -> #r<u64, #error> {
                    #site_in_mod.bust_all(#client_in_mod).await
                }

                #[doc = #doc_refresh]
                pub async fn refresh #generics (#params) -> #output #where_clause {
                    #refresh_body
                }

                #[doc = #doc_function]
                pub fn function() -> #r<::cache_money::Function, #error> {
                    #site_in_mod.function(#client_in_mod)
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Result` by its last path segment, through parentheses; nothing else is.
    #[test]
    fn results_are_recognised_by_name() {
        for fallible in [
            "Result<i64, String>",
            "std::io::Result<u8>",
            "(anyhow::Result<()>)",
        ] {
            assert!(is_result(&syn::parse_str(fallible).unwrap()), "{fallible}");
        }
        for plain in [
            "i64",
            "Option<Result<i64, String>>",
            "Vec<Result<u8, u8>>",
            "ResultSet",
        ] {
            assert!(!is_result(&syn::parse_str(plain).unwrap()), "{plain}");
        }
    }

    /// A function naming `Self` outside nested items is associated; a free function with an
    /// `impl` of its own inside is not.
    #[test]
    fn associated_functions_are_recognised_by_self() {
        let function = |text: &str| syn::parse_str::<ItemFn>(text).unwrap();
        assert!(associated_without_self(&function("async fn f(a: i64) -> Self { a }")).is_some());
        assert!(associated_without_self(&function("async fn f() -> i64 { Self::g() }")).is_some());
        let nested = "async fn f() -> i64 { struct X; impl X { fn new() -> Self { X } } 1 }";
        assert!(associated_without_self(&function(nested)).is_none());
    }

    /// `impl` is found wherever it is nested in a type.
    #[test]
    fn impl_trait_is_found_when_nested() {
        assert!(find_impl(quote!(impl Display)).is_some());
        assert!(find_impl(quote!(Vec<Box<impl Display>>)).is_some());
        assert!(find_impl(quote!(Vec<Implement>)).is_none());
    }
}
