//! Chat templates: the built-in formats render exactly as documented, SmolLM2's carried template
//! renders through the Hugging-Face-compatible environment, and template errors are errors.

use cortensor::models::chat::{ChatError, ChatMessage, ChatTemplate};
use cortensor::models::fetch;
use cortensor::models::gguf::GgufFile;
use cortensor::models::tokenizer::Tokenizer;

fn conversation() -> Vec<ChatMessage> {
    vec![
        ChatMessage::system("Be brief."),
        ChatMessage::user("Hi!"),
        ChatMessage::assistant("Hello."),
        ChatMessage::user("2+2?"),
    ]
}

#[test]
fn llama3_builtin_renders_meta_format() {
    let t = ChatTemplate::llama3();
    let expected = "<|begin_of_text|>\
<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\
<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>\
<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>\
<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>";
    assert_eq!(t.render(&conversation(), false).unwrap(), expected);
    assert_eq!(
        t.render(&conversation(), true).unwrap(),
        format!("{expected}<|start_header_id|>assistant<|end_header_id|>\n\n")
    );
    assert_eq!(
        t.render(&[], true).unwrap(),
        "<|begin_of_text|><|start_header_id|>assistant<|end_header_id|>\n\n"
    );
}

#[test]
fn chatml_builtin_renders_documented_format() {
    let t = ChatTemplate::chatml();
    let expected = "<|im_start|>system\nBe brief.<|im_end|>\n\
<|im_start|>user\nHi!<|im_end|>\n\
<|im_start|>assistant\nHello.<|im_end|>\n\
<|im_start|>user\n2+2?<|im_end|>\n";
    assert_eq!(t.render(&conversation(), false).unwrap(), expected);
    assert_eq!(
        t.render(&conversation(), true).unwrap(),
        format!("{expected}<|im_start|>assistant\n")
    );
}

#[test]
fn content_is_not_interpreted() {
    // Jinja syntax inside a message is data, not template code.
    let msgs = [ChatMessage::user("{{ 7*7 }} {% if %} <b>&amp;</b>\n")];
    assert_eq!(
        ChatTemplate::chatml().render(&msgs, false).unwrap(),
        "<|im_start|>user\n{{ 7*7 }} {% if %} <b>&amp;</b>\n<|im_end|>\n"
    );
}

#[test]
fn smollm2_carried_template() {
    let path = fetch::ensure(&fetch::SMOLLM2_135M_Q4_1, &fetch::cache_dir(), &mut |_| {})
        .expect("fetch the SmolLM2 GGUF");
    let gguf = GgufFile::open(&path).expect("open GGUF");
    let tok = Tokenizer::from_gguf(&gguf).expect("tokenizer");
    let carried = tok
        .chat_template()
        .expect("SmolLM2 carries a chat template");
    let t = ChatTemplate::for_model(Some(carried), &tok).unwrap();
    assert_eq!(t.bos_token(), "<|im_start|>");
    assert_eq!(t.eos_token(), "<|im_end|>");

    // No system message: the template inserts its default one.
    let out = t.render(&[ChatMessage::user("Hi")], true).unwrap();
    assert_eq!(
        out,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    // With one, it is used instead.
    let out = t
        .render(
            &[ChatMessage::system("Be brief."), ChatMessage::user("Hi")],
            false,
        )
        .unwrap();
    assert_eq!(
        out,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    );

    // Without a carried template the vocabulary (no <|start_header_id|>) selects ChatML.
    let fallback = ChatTemplate::for_model(None, &tok).unwrap();
    assert_eq!(
        fallback.render(&[ChatMessage::user("Hi")], true).unwrap(),
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn llama3_vocabulary_selects_llama3_template() {
    let path = fetch::ensure(&fetch::LLAMA3_TOKENIZER, &fetch::cache_dir(), &mut |_| {})
        .expect("fetch the llama3 tokenizer.model");
    let tok = Tokenizer::from_tiktoken_file(&path).unwrap();
    let t = ChatTemplate::for_model(None, &tok).unwrap();
    assert_eq!(
        t.render(&[ChatMessage::user("Hi")], true).unwrap(),
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\
<|start_header_id|>assistant<|end_header_id|>\n\n"
    );
    // An empty carried template counts as none.
    assert!(ChatTemplate::for_model(Some("  "), &tok).is_ok());
}

#[test]
fn hugging_face_environment() {
    // Python string methods (pycompat), trim_blocks/lstrip_blocks, bos/eos variables.
    let src = "{{ bos_token }}
{% for m in messages %}
    {% if m.content.strip().startswith('!') %}
[{{ m.role.upper() }}:{{ m.content.strip() }}]
    {% else %}
({{ m['content'] | trim }})
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}>{% endif %}{{ eos_token }}";
    let t = ChatTemplate::from_source(src, "<s>", "</s>").unwrap();
    let msgs = [ChatMessage::user("  !cmd "), ChatMessage::assistant(" ok ")];
    assert_eq!(
        t.render(&msgs, true).unwrap(),
        "<s>\n[USER:!cmd]\n(ok)\n></s>"
    );
    assert_eq!(
        t.render(&msgs, false).unwrap(),
        "<s>\n[USER:!cmd]\n(ok)\n</s>"
    );
    // strftime_now exists (Llama 3.1+ templates call it) and gives a 4-digit year.
    let t = ChatTemplate::from_source("{{ strftime_now('%Y') }}", "", "").unwrap();
    let year = t.render(&[], false).unwrap();
    assert!(
        year.len() == 4 && year.chars().all(|c| c.is_ascii_digit()),
        "{year}"
    );
}

#[test]
fn raise_exception_is_an_error() {
    let src = "{% for m in messages %}{% if m.role == 'tool' %}\
{{ raise_exception('Tool messages are not supported') }}{% endif %}{{ m.content }}{% endfor %}";
    let t = ChatTemplate::from_source(src, "", "").unwrap();
    assert_eq!(t.render(&[ChatMessage::user("ok")], false).unwrap(), "ok");
    match t.render(&[ChatMessage::new("tool", "x")], false) {
        Err(ChatError::Raised(msg)) => assert_eq!(msg, "Tool messages are not supported"),
        other => panic!("expected Raised, got {other:?}"),
    }
}

#[test]
fn syntax_errors_are_errors() {
    for src in [
        "{% for m in messages %}{{ m.content }}",
        "{{ messages[0 }}",
        "{% if %}{% endif %}",
        "{% endfor %}",
    ] {
        match ChatTemplate::from_source(src, "", "") {
            Err(ChatError::Syntax(msg)) => assert!(!msg.is_empty()),
            other => panic!("{src:?}: expected a syntax error, got {other:?}"),
        }
    }
}

#[test]
fn render_errors_are_errors_not_panics() {
    let t =
        ChatTemplate::from_source("{{ messages[0].content.no_such_method() }}", "", "").unwrap();
    assert!(matches!(
        t.render(&[ChatMessage::user("x")], false),
        Err(ChatError::Render(_))
    ));
    let t = ChatTemplate::from_source("{{ 1 // 0 }}", "", "").unwrap();
    assert!(matches!(t.render(&[], false), Err(ChatError::Render(_))));
}

#[test]
fn chat_message_serde() {
    let m: ChatMessage = serde_json::from_str(r#"{"role":"user","content":"hi"}"#).unwrap();
    assert_eq!(m, ChatMessage::user("hi"));
    assert_eq!(
        serde_json::to_string(&m).unwrap(),
        r#"{"role":"user","content":"hi"}"#
    );
}
